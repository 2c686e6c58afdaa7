"""`forecast-grpo plan`: the memory estimate against DeepSpeed's estimators, against what the tiny learner really
allocates and what autograd really keeps; placement and refusals; the shipped size configs fit their hardware."""

import gc
import warnings

import pytest
import torch

from cluster import memory, placement, plan
from cluster.config import ConfigError, load_config
from learner.config import LearnerConfig, LoraConfig
from tests.conftest import ROOT, make_cfg

SIZE_CONFIGS = {"qwen2.5-1.5b.yaml": 1, "qwen2.5-7b.yaml": 1, "qwen2.5-14b.yaml": 2}  # file -> nodes of 8 x 80 GB
GIB = memory.GIB


def _gpu(parts):
    return sum(p.bytes for p in parts if not p.on_cpu)


def _cpu(parts):
    return sum(p.bytes for p in parts if p.on_cpu)


def test_built_in_shapes_have_the_published_parameter_counts():
    counts = {name: shape.params for name, shape in memory.QWEN2_5.items()}
    assert counts == {"Qwen/Qwen2.5-1.5B-Instruct": 1_543_714_304, "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
                      "Qwen/Qwen2.5-14B-Instruct": 14_770_033_664}
    with pytest.raises(ConfigError, match="model.path 'nope/nope'"):
        memory.model_shape("nope/nope")


def test_shape_from_config_json_counts_the_tiny_model_as_deepspeed_does(tiny_model):
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoModelForCausalLM

    shape = memory.model_shape(str(tiny_model))
    assert (shape.params, shape.largest_layer) == model_to_params(AutoModelForCausalLM.from_pretrained(tiny_model))


@pytest.mark.parametrize("name", sorted(memory.QWEN2_5))
def test_model_states_equal_deepspeeds_estimators(name):
    """bf16: our table gives DeepSpeed's GPU figures exactly, and its CPU figures (with its 1.5 buffer factor)."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shape = memory.QWEN2_5[name]
    p, ll = shape.params, shape.largest_layer
    for gpus in (1, 4, 8):
        for offload in (False, True):
            ours = memory.model_states(shape, LearnerConfig(world_size=gpus, zero_stage=2,
                                                            offload_optimizer=offload), 2)
            _, ds_gpu = estimate_zero2_model_states_mem_needs(p, num_gpus_per_node=gpus, cpu_offload=offload)
            assert _gpu(ours) == pytest.approx(ds_gpu, abs=1)
    for nodes in (1, 2):
        for opt, params in ((False, False), (True, False), (True, True)):
            ours = memory.model_states(shape, LearnerConfig(world_size=8 * nodes, zero_stage=3, offload_optimizer=opt,
                                                            offload_params=params), 2)
            ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(p, ll, num_gpus_per_node=8, num_nodes=nodes,
                                                                       cpu_offload=opt, cpu_offload_params=params)
            assert _gpu(ours) == pytest.approx(ds_gpu, abs=1)
            if opt:  # per node: 8 ranks' offloaded partitions
                assert 8 * _cpu(ours) * memory.CPU_BUFFER_FACTOR == pytest.approx(ds_cpu, abs=8)


def _live_storages() -> dict[int, int]:
    """data_ptr -> bytes of every tensor storage the interpreter can reach."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some lazily imported modules warns
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor):
                s = o.untyped_storage()
                out[s.data_ptr()] = s.nbytes()
    return out


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("stage", [0, 2])
def test_model_states_match_what_the_tiny_learner_allocates(tiny_model, stage, lora):
    """Every tensor alive just before the second optimizer step, less those alive before the learner existed: the
    weights, their gradients and the Adam moments (and at ZeRO-2 DeepSpeed's fp32 copy of the weights). Besides
    them only a few small tensors live then (rotary frequencies, the step's metric sums): under 0.1% here, while a
    state tensor missing from or extra to the estimate is 4 bytes per parameter (20% or more). Hence 1%. With LoRA
    (r=32: 37% of the tiny model's parameters, so that a state of the adapters' missing from or extra to the
    estimate is over 1% too), the frozen weights and the adapters' states."""
    from learner.learner import Learner
    from tests.test_learner import _batch

    cfg = make_cfg(tiny_model, f"learner.zero_stage={stage}", "learner.micro_batch_size=4",
                   *(["learner.lora.r=32"] if lora else []))
    before = _live_storages()
    learner = Learner(cfg.learner_job())
    seen = []
    step = learner.engine.step

    def snapshot_then_step(*args, **kwargs):
        seen.append(_live_storages())
        return step(*args, **kwargs)

    learner.engine.step = snapshot_then_step
    for _ in range(2):
        batch, _ = _batch(learner.tokenizer, [[-1.0, -0.5, -0.2, -0.4]], [learner.steps_done])
        learner.train_step(batch)
    allocated = sum(n for ptr, n in seen[-1].items() if ptr not in before)
    estimate = sum(p.bytes for p in memory.model_states(memory.model_shape(str(tiny_model)), cfg.learner, 4))
    assert allocated == pytest.approx(estimate, rel=0.01)


def _gqa_model():
    """A randomly initialised Qwen2 with 2 key/value heads for 4 query heads and untied embeddings: the layout of
    the Qwen2.5 models, where the keys and values are repeated per query head (the tiny model has one KV head)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=256, vocab_size=300, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


@pytest.mark.parametrize("model", ["tiny", "gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("lora", [None, LoraConfig(r=8)])
def test_activation_formula_matches_what_autograd_keeps(tiny_model, model, dtype, checkpointing, lora, monkeypatch):
    """The bytes of every tensor autograd saves for the backward (less the weights it saves views of) through the
    loss's logsumexp, for a padded batch like the learner's, against the formula in cluster/memory.py. What the
    formula leaves out is the rotary cos/sin (2 x head_dim per position, shared by the batch): < 0.7% here. With
    LoRA's adapters on the default projections (without dropout) too.

    torch's own F.linear: a ZeRO-3 model loaded earlier in this process (tests/test_lora.py) leaves DeepSpeed's
    replacement in place ("this will persist unless manually reset"), which keeps a frozen layer's input too: with
    LoRA, a learner at ZeRO-3 keeps a little more than the formula (3% on the tiny model)."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as ZeroInit
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(torch.nn.functional, "linear", getattr(ZeroInit, "linear_bk", torch.nn.functional.linear))

    from learner import grpo
    from learner import lora as adapters

    net = AutoModelForCausalLM.from_pretrained(tiny_model) if model == "tiny" else _gqa_model()
    net = net.to(dtype)
    if checkpointing:
        net.gradient_checkpointing_enable()
    if lora:
        net = adapters.wrap(net, lora, seed=0)
    net.train()
    c = net.config
    shape = memory.ModelShape(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                              c.hidden_size // c.num_attention_heads, c.intermediate_size, c.vocab_size,
                              c.tie_word_embeddings)
    b, s = 4, 128
    ids = torch.randint(3, c.vocab_size, (b, s))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, as in the learner's micro-batches
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        logits = net(input_ids=ids, attention_mask=mask, use_cache=False).logits
        grpo.token_logprobs(logits, ids)
    d = 2 if dtype == torch.bfloat16 else 4
    estimate = memory.saved_activation_bytes(shape, d, b, s, s, checkpointing, lora)
    assert sum(saved.values()) == pytest.approx(estimate, rel=0.01)


@pytest.mark.parametrize("model", ["tiny", "gqa"])
@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj", "down_proj"]])
def test_adapter_parameters_are_what_peft_trains(tiny_model, model, targets):
    """The plan's count of LoRA's trained parameters is peft's, on the tiny model (one key/value head, tied
    embeddings) and a grouped-query one (k_proj and v_proj narrower than q_proj)."""
    from transformers import AutoModelForCausalLM

    from learner import lora

    net = AutoModelForCausalLM.from_pretrained(tiny_model) if model == "tiny" else _gqa_model()
    shape = memory.model_shape(str(tiny_model)) if model == "tiny" else memory.ModelShape(128, 2, 4, 2, 32, 256,
                                                                                           300, False)
    cfg = LoraConfig(r=8, **({"target_modules": targets} if targets else {}))
    trained, total = lora.wrap(net, cfg, seed=0).get_nb_trainable_parameters()
    assert (shape.adapter_params(cfg), shape.params) == (trained, total - trained)
    with pytest.raises(ConfigError, match="learner.lora.target_modules: .* not qkv"):
        shape.adapter_params(LoraConfig(target_modules=["qkv"]))


@pytest.mark.parametrize("name,nodes", SIZE_CONFIGS.items())
def test_size_configs_plan_ok_on_their_hardware(name, nodes):
    cfg = load_config(ROOT / "cluster/configs" / name)
    hw = cfg.ray.cluster
    assert (hw.nodes, hw.gpus_per_node, hw.gpu_memory_gib) == (nodes, 8, 79)
    p = plan.make_plan(cfg)
    assert p.problems == []
    assert len(p.gpu_bytes) == 8 * nodes  # every GPU has a role
    assert max(p.gpu_bytes.values()) <= 79 * GIB
    # the prompt and the whole trajectory fit the engine's context
    assert cfg.rollout.max_model_len >= cfg.rollout.max_trajectory_tokens + 512
    if nodes == 2:  # the learner ranks fill the first node, the rollout workers the second
        assert {s.node for s in p.slots if s.bundle.role.startswith("learner")} == {0}
        assert {s.node for s in p.slots if s.bundle.role.startswith("rollout")} == {1}


def test_the_14b_learner_needs_its_optimizer_offloaded():
    """The refusal names the role and the shortfall: what the learner's GPU parts add up to, less the GPU."""
    cfg = load_config(ROOT / "cluster/configs/qwen2.5-14b.yaml", ["learner.offload_optimizer=false"])
    p = plan.make_plan(cfg)
    need = _gpu(p.learner) / GIB
    assert need > 79
    assert p.problems == [f"learner rank: needs {need:.1f} GiB per GPU, a GPU has 79 (ray.cluster.gpu_memory_gib): "
                          f"{need - 79:.1f} GiB short (learner rank 0 on node 0 GPU 0; learner rank 1 on node 0 "
                          "GPU 1; ...)"]


def test_with_lora_the_14b_learner_fits_without_offload():
    """The option qwen2.5-14b.yaml documents: the frozen weights partitioned, the adapters' optimizer on the GPUs,
    no reference copy; full fine-tuning needs its optimizer offloaded (above)."""
    lora = ["learner.lora.r=64", "learner.lora.alpha=128", "learner.offload_optimizer=false", "learner.lr=5e-6"]
    p = plan.make_plan(load_config(ROOT / "cluster/configs/qwen2.5-14b.yaml", lora))
    assert p.problems == [] and _cpu(p.learner) == 0 and _gpu(p.learner) < 56 * GIB
    names = [part.what for part in p.learner]
    assert "frozen weights, bf16 (1/8)" in names and not any(n.startswith("reference") for n in names)


@pytest.mark.parametrize("overrides,needle", [
    (["rollout.prompts_per_step=64"], "rollout worker: its KV cache needs 48.0 GiB (64 sequences x "
                                      "rollout.max_model_len=4096 tokens)"),
    (["ray.cluster.cpu_memory_gib=256"], "node 0: its roles need 330.1 GiB of CPU memory, a node has 256 "
                                         "(ray.cluster.cpu_memory_gib): 74.1 GiB short"),
    (["ray.cluster.nodes=1"], "no room for rollout worker 0: the job asks for 16 GPUs (8 learner ranks x 1, 8 "
                              "rollout workers x 1) and 64 CPUs; ray.cluster has 8 GPUs"),
])
def test_plan_refuses_what_does_not_fit_naming_role_and_shortfall(overrides, needle):
    p = plan.make_plan(load_config(ROOT / "cluster/configs/qwen2.5-14b.yaml", overrides))
    assert any(needle in problem for problem in p.problems), p.problems


def test_a_tensor_parallel_worker_must_fit_on_one_node():
    cfg = load_config(ROOT / "cluster/configs/qwen2.5-7b.yaml", ["rollout.tensor_parallel_size=16"])
    with pytest.raises(placement.PlacementError, match="rollout worker 0 needs 16 GPUs on one node .* a node has 8 "
                       r"\(ray.cluster.gpus_per_node\): 8 GPUs short"):
        placement.place(cfg)
    # enough GPUs in all (6 + 2 x 5 = 16), but after the learner and one worker no node has 5 free
    cfg = load_config(ROOT / "cluster/configs/qwen2.5-14b.yaml",
                      ["learner.world_size=6", "rollout.num_workers=2", "rollout.tensor_parallel_size=5",
                       "rollout.prompts_per_step=24"])
    with pytest.raises(placement.PlacementError, match="no room for rollout worker 1 .* split across nodes"):
        placement.place(cfg)


def test_bundles_are_learner_ranks_then_workers_each_worker_on_one_node():
    cfg = load_config(ROOT / "cluster/configs/qwen2.5-7b.yaml",
                      ["rollout.tensor_parallel_size=2", "rollout.num_workers=2"])
    assert [b.resources() for b in placement.bundles(cfg)] == [{"CPU": 4, "GPU": 1}] * 4 + [{"CPU": 4, "GPU": 2}] * 2
    assert [(s.bundle.role, s.node, s.gpus) for s in placement.place(cfg)][3:] == [
        ("learner rank 3", 0, (3,)), ("rollout worker 0", 0, (4, 5)), ("rollout worker 1", 0, (6, 7))]


def test_cli_plans_the_cpu_demo_and_refuses_with_exit_1(tiny_model, capsys):
    demo = str(ROOT / "cluster/configs/demo-cpu.yaml")
    assert plan.main(["--config", demo, "--set", f"model.path={tiny_model}"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(demo, [f"model.path={tiny_model}"])
    states = memory.model_states(memory.model_shape(str(tiny_model)), cfg.learner, memory.dtype_bytes(cfg))
    assert "CPU-only" in out
    assert f"model states (weights, gradients, optimizer): {plan._size(sum(p.bytes for p in states))}" in out
    assert plan.main(["--config", str(ROOT / "cluster/configs/qwen2.5-7b.yaml"), "--set", "learner.zero_stage=0"]) == 1
    assert "REFUSED" in capsys.readouterr().out


def test_offload_keys_are_checked_and_reach_deepspeed():
    from learner.learner import deepspeed_config

    with pytest.raises(ConfigError, match=r"learner.offload_params needs learner.zero_stage 3 \(got 2\)"):
        load_config(None, ["learner.zero_stage=2", "learner.offload_params=true"])
    with pytest.raises(ConfigError, match=r"learner.offload_optimizer needs learner.zero_stage 1, 2 or 3 \(got 0\)"):
        load_config(None, ["learner.offload_optimizer=true"])
    cfg = load_config(None, ["learner.zero_stage=3", "learner.offload_optimizer=true", "learner.offload_params=true"])
    zero = deepspeed_config(cfg.learner_job(), on_gpu=True)["zero_optimization"]
    assert zero["offload_optimizer"] == zero["offload_param"] == {"device": "cpu", "pin_memory": True}
