"""LoRA (`learner.lora`) on the real Learner, in-process (DeepSpeed on gloo, world size 1, no Ray): only the adapters
train, the engines get the merged weights under the base model's names, the KL's reference is the base model, and a
checkpoint (the adapter, the merged folder, the adapters' optimizer) continues exactly, at every ZeRO stage.
The engine's side of a sync (vLLM's logprobs after it) is in tests/test_weight_sync.py."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cluster.config import ConfigError, dump_config, load_config
from learner import forward, lora
from learner.config import LoraConfig
from learner.learner import Learner
from rollout.trajectory import TrajectoryBatch
from tests.conftest import make_cfg
from tests.test_learner import _batch

LORA = ["learner.lora.r=4", "learner.lora.alpha=8", "learner.lr=0.01", "grpo.kl_beta=0.1", "learner.micro_batch_size=4"]


def _varied(tok, version: int) -> TrajectoryBatch:
    """One group whose answers differ and score differently: a gradient that does not cancel."""
    parts = [_batch(tok, [[r]], [version], answer=f"<answer>0.{d}</answer>")[0]
             for d, r in ((1, -0.9), (3, -0.5), (5, -0.2), (7, -0.6))]
    batch = TrajectoryBatch.concat(parts)
    batch.group_ids[:] = 0
    return batch


def _learner(tiny_model, stage: int, *sets: str, run_dir=None) -> Learner:
    return Learner(make_cfg(tiny_model, f"learner.zero_stage={stage}", *LORA, *sets).learner_job(),
                   run_dir=None if run_dir is None else str(run_dir))


def _base(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def _logprobs(model, learner: Learner, batch: TrajectoryBatch) -> np.ndarray:
    """A plain Hugging Face model's logprobs of the batch's completion tokens, in the learner's layout."""
    mb = forward.build(batch, np.arange(batch.num_sequences), learner.tokenizer.pad_token_id or 0, "cpu")
    with torch.no_grad():
        logp = forward.completion_logprobs(model, mb, learner.cfg.temperature)[0].numpy()
    m = batch.loss_mask.astype(bool)
    out = np.zeros(len(batch.tokens), dtype=np.float32)
    for i in range(batch.num_sequences):
        s = batch.offsets[i] + batch.prompt_lens[i]
        out[s:batch.offsets[i + 1]] = logp[i, : batch.offsets[i + 1] - s]
    return out[m]


def test_lora_is_off_until_one_of_its_keys_is_set(tmp_path, tiny_model):
    assert load_config(None, []).learner.lora is None
    on = load_config(None, ["learner.lora.r=8"])
    assert on.learner.lora == LoraConfig(r=8) and "down_proj" in on.learner.lora.target_modules
    (tmp_path / "job.yaml").write_text(dump_config(on))  # as a run folder's config.yaml, read again on --resume
    assert load_config(tmp_path / "job.yaml").learner.lora == LoraConfig(r=8)
    (tmp_path / "job.yaml").write_text("learner:\n  lora: {}\n")
    assert load_config(tmp_path / "job.yaml").learner.lora == LoraConfig()
    assert load_config(tmp_path / "job.yaml", ["learner.lora=null"]).learner.lora is None
    with pytest.raises(ConfigError, match=r"'learner.lora' is a section; set one of its keys \(or null: off\)"):
        load_config(None, ["learner.lora=8"])
    with pytest.raises(ConfigError, match="unknown key 'learner.lora.rank'"):
        load_config(None, ["learner.lora.rank=8"])
    with pytest.raises(ValueError, match=r"learner.lora.target_modules \['qkv'\]: Target modules \{'qkv'\} not found"):
        lora.wrap(_base(tiny_model), LoraConfig(target_modules=["qkv"]), seed=0)
    with pytest.raises(ValueError, match="ties its input and output embeddings .* an adapter on one would untie them"):
        lora.wrap(_base(tiny_model), LoraConfig(target_modules=["q_proj", "lm_head"]), seed=0)


@pytest.fixture(scope="module")
def trained(tiny_model):
    """A ZeRO-0 LoRA learner after two steps (B starts at 0, so A's gradient is 0 until B has moved once)."""
    learner = _learner(tiny_model, 0)
    before = {n: p.detach().clone() for n, p in learner.engine.module.named_parameters()}
    metrics = [learner.train_step(_varied(learner.tokenizer, learner.steps_done)) for _ in range(2)]
    return learner, before, metrics


def test_only_the_adapters_train(trained):
    learner, before, metrics = trained
    after = dict(learner.engine.module.named_parameters())
    adapters = {n for n in after if ".lora_A." in n or ".lora_B." in n}
    assert {n for n, p in after.items() if p.requires_grad} == adapters
    assert len(adapters) == 2 * 7 * 2  # A and B of 7 projections in each of 2 layers
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed == adapters
    assert metrics[0]["kl"] == 0.0 < metrics[1]["kl"]  # the adapters start as a no-op, then move off the base
    assert learner.reference is None  # the KL's reference is the model itself, adapters off: no copy loaded


def test_the_export_is_the_merged_model_under_the_base_models_names(trained, tiny_model):
    learner, _, _ = trained
    exported = {n: t for chunk in learner.named_weight_chunks() for n, t in chunk}
    base = _base(tiny_model)
    assert list(exported) == [n for n, _ in base.named_parameters()]  # names and order: what vLLM loads
    peft_params = dict(learner.engine.module.get_base_model().named_parameters())
    scale = 8 / 4
    for name, p in base.named_parameters():
        owner = name.removesuffix(".weight")
        if f"{owner}.lora_A.default.weight" in peft_params:
            a, b = peft_params[f"{owner}.lora_A.default.weight"], peft_params[f"{owner}.lora_B.default.weight"]
            manual = p.detach() + scale * (b @ a).detach()
            assert not torch.equal(manual, p)
            torch.testing.assert_close(exported[name], manual, rtol=0, atol=1e-6)
        else:
            assert torch.equal(exported[name], p.detach()), name
    # the merged weights in a plain Hugging Face model give the learner's own logprobs (adapters on)
    batch = _varied(learner.tokenizer, learner.steps_done)
    base.load_state_dict(exported, strict=False)
    assert np.abs(_logprobs(base, learner, batch) - learner.sequence_logprobs(batch)[batch.loss_mask.astype(bool)]
                  ).max() < 1e-4  # fp32 rounding: the adapters add in a different order


def test_the_kl_reference_is_the_base_model(trained, tiny_model):
    learner, _, _ = trained
    batch = _varied(learner.tokenizer, learner.steps_done)
    m = batch.loss_mask.astype(bool)
    reference = learner.sequence_logprobs(batch, reference=True)[m]
    assert np.abs(reference - _logprobs(_base(tiny_model), learner, batch)).max() < 1e-6
    assert np.abs(reference - learner.sequence_logprobs(batch)[m]).max() > 1e-3  # the adapters are back on


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_checkpoint_holds_adapter_and_merged_folder_and_continues_exactly(tiny_model, tmp_path, stage):
    import peft

    first = _learner(tiny_model, stage, run_dir=tmp_path)
    for _ in range(2):
        first.train_step(_varied(first.tokenizer, first.steps_done))
    files = first.save_checkpoint("checkpoints/step_000002")
    ckpt = tmp_path / "checkpoints/step_000002"
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "model.safetensors",
            "config.json"} <= set(files)
    assert json.loads((ckpt / "adapter/adapter_config.json").read_text())["r"] == 4
    # the DeepSpeed state holds the adapters and their optimizer, not the frozen weights (model.path's)
    assert sum(v for k, v in files.items() if k.startswith("deepspeed/")) < 0.5 * files["model.safetensors"]
    # peft's adapter on the base model, merged, is the merged folder
    merged = load_file(ckpt / "model.safetensors")
    via_peft = peft.PeftModel.from_pretrained(_base(tiny_model), ckpt / "adapter").merge_and_unload()
    for name, p in via_peft.named_parameters():
        torch.testing.assert_close(merged[name], p.detach(), rtol=0, atol=1e-6)

    step = _varied(first.tokenizer, 2)
    expected = first.train_step(step)
    second = _learner(tiny_model, stage, run_dir=tmp_path)
    assert second.load_checkpoint("checkpoints/step_000002") == 2
    got = second.train_step(step)
    for key in ("loss", "grad_norm", "kl", "lr"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key
    a = {n: t for chunk in first.named_weight_chunks() for n, t in chunk}
    b = {n: t for chunk in second.named_weight_chunks() for n, t in chunk}
    assert all(torch.equal(a[n], b[n]) for n in a)
