"""Memory per GPU (and per node's CPU memory) of the job's roles, estimated from the model's shape and the config.

Learner rank (DeepSpeed, model dtype of d bytes, R = learner.world_size ranks):

  model states, bytes per parameter: the ZeRO paper's mixed-precision accounting (Rajbhandari et al. 2020,
  arXiv:1910.02054, section 3: 2 bf16 weights + 2 bf16 gradients + 12 fp32 master weights and Adam moments), plus
  the fp32 gradient partition DeepSpeed's optimizer step reads (its own estimators count it: "18 = 2_grads_16bit +
  4_grads_32bit + 4_params_32bit + 8_optimizer_states_32bit", deepspeed/runtime/zero/stage_1_and_2.py). Training in
  fp32 is 4 + 4 + 8, and ZeRO 1-3 add a fp32 copy of the weight partition for the optimizer (measured on the tiny
  model: 20 bytes per parameter at ZeRO-2, 16 at ZeRO-0). ZeRO stage 1 partitions the optimizer's part over the R
  ranks, 2 the gradients too, 3 the weights too (and then reduces gradients straight into the fp32 partition, and
  gathers a layer at a time: DeepSpeed's "4 x largest layer" working set). offload_optimizer moves the optimizer's
  part to CPU memory (the bf16 gradients stream into it), offload_params the weights too.

      part                    bytes/param                        partitioned from   in CPU memory with
      weights                 d                                  stage 3            offload_params
      gradients, model dtype  d, below stage 3                   stage 2            (offload_optimizer: not kept)
      fp32 gradients          4, if d != 4, stage 3 or offload   stage 1            offload_optimizer
      fp32 master weights     4, if d != 4 or stage >= 1         stage 1            offload_optimizer
      Adam moments            8                                  stage 1            offload_optimizer

  activations of one micro-batch of b = learner.micro_batch_size sequences, each counted as S = rollout.max_model_len
  tokens, the last C of which have logits (C = rollout.max_trajectory_tokens with tools, else max_new_tokens): what
  autograd keeps, counted tensor by tensor for transformers' Qwen2 layer the way Korthikanti et al. 2022
  (arXiv:2205.05198, section 4.1) count GPT's 34·s·b·h. Per token and layer, with hidden size h, query width
  q = heads x head_dim, key width k, MLP width I:
      8h + 8 + d·(4h + 2q + 2k + 4I + S) + 4·heads
  Both RMSNorms keep an fp32 copy of their input (4h each), their rstd (4 each) and their output and the next
  projection's input (d·h each); q after RoPE and the attention output, d·q each; keys and values, d·k each, where
  transformers repeats them to every query head when there is a padding mask (k = q; with a single key/value head
  the repeat is a view: k = head_dim); the MLP's gate, up, SiLU and product, d·I each; the attention mask SDPA gets,
  d·S; its logsumexp, 4 per head. SDPA never stores the attention probabilities. With gradient checkpointing a
  layer keeps only its input (d·h) and the backward recomputes one layer at a time. On top, per token: the ids, the
  final norm and the lm_head input (8 + 4h + 4 + 2dh); per logit position: the fp32 copy the loss keeps (4·vocab),
  around which the model's logits and their concatenation (d each) and an fp32 temporary (4) are alive. The
  prompt-shared forward (learner/forward.py) also repeats a prompt's keys and values for each of its completions.
  `tests/test_plan.py` checks the formula against what autograd saves for the tiny model and a grouped-query one.
  Not counted: the entropy bonus's extra logits-sized tensors (grpo.entropy_coef > 0).
  buffers: DeepSpeed's gradient bucket (reduce_bucket_size elements of d bytes, or the whole model if smaller), the
  reference model's weights when grpo.kl_beta > 0 (partitioned under ZeRO-3), and an allowance for the CUDA context.

  With LoRA (`learner.lora`, learner/lora.py): the model's weights are frozen, d bytes per parameter (partitioned
  at stage 3, in CPU memory with offload_params) and nothing else; the adapters, r x (in + out) parameters per
  targeted projection of every layer, have the whole table above. No reference model (the KL's reference is the
  model with its adapters off), and the gradient bucket holds the adapters' gradients. Activations: frozen norm
  weights keep no normalised copy of their input (d·h each), the frozen embedding and lm_head keep no token ids and
  no lm_head input, layer 0's first norm keeps nothing (its input needs no gradient: this cancels the final norm's
  4h + 4); each adapter keeps its A x (d·r per token) and, with lora.dropout > 0, the dropped-out input and the mask
  of GPUs' fused dropout ((d + 1) per input feature; CPUs keep the mask in the model's dtype). The adapters' inputs
  are the projections' inputs already counted, so with fewer target_modules than the default this is an upper bound.
  At ZeRO-3, DeepSpeed's replacement of F.linear also keeps frozen layers' inputs: a few % more (3% on the tiny model).

Rollout worker (vLLM): it claims rollout.gpu_memory_utilization of each of its T = tensor_parallel_size GPUs; its
weights (1/T of them), the CUDA context and its profiling pass come out of that, and the rest is KV cache
(vllm/v1/worker/gpu_worker.py: requested memory less non-KV memory), which must hold max_model_len tokens for every
sequence the worker samples at once (its share of a step's prompts x group_size). KV bytes per token and GPU:
2 x layers x kv_heads/T x head_dim x d. On CPU: the weights, and rollout.cpu_kvcache_gib of KV cache.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from cluster.config import ConfigError, JobConfig
from learner.config import LearnerConfig, LoraConfig

GIB = 1 << 30
RUNTIME_BYTES = 2 * GIB
"""Per GPU process, an allowance (not measured here): the CUDA context, NCCL communicators and allocator slack."""
REDUCE_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default zero_optimization.reduce_bucket_size: the gradient bucket it fills during the backward."""
CPU_BUFFER_FACTOR = 1.5
"""DeepSpeed's estimators' additional_buffer_factor for CPU memory holding offloaded states (pinned buffers)."""
VLLM_MAX_NUM_BATCHED_TOKENS = 16384
VLLM_MAX_NUM_SEQS = 1024
"""vLLM's LLM-class defaults on GPUs of 70 GiB or more (vllm/engine/arg_utils.py, get_batch_defaults): its profiling
forward pass runs this many tokens, its sampler this many sequences; and it runs at most this many at once."""


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def params(self) -> int:
        """Qwen2: q/k/v projections with biases, o_proj and the SwiGLU MLP without, two RMSNorms per layer."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * self.intermediate + 2 * h
        return self.layers * layer + self.vocab * h * (1 if self.tied else 2) + h

    @property
    def largest_layer(self) -> int:
        """Parameters of the largest module (DeepSpeed's largest_layer_params): the embedding, for these models."""
        h = self.hidden
        return max(self.vocab * h, h * self.intermediate, h * self.heads * self.head_dim + self.heads * self.head_dim)

    @property
    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of a decoder layer, by its name in Llama and Qwen2 models."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
                "up_proj": (h, i), "down_proj": (i, h)}

    def adapter_params(self, lora: LoraConfig) -> int:
        """LoRA's trained parameters: r x (in + out) for each targeted projection of every layer."""
        unknown = [m for m in lora.target_modules if m not in self.projections]
        if unknown:
            raise ConfigError(f"learner.lora.target_modules: the plan knows the projections of Llama and Qwen2 "
                              f"layers ({', '.join(self.projections)}), not {', '.join(unknown)}")
        return self.layers * sum(lora.r * sum(self.projections[m]) for m in lora.target_modules)

    def kv_bytes_per_token(self, dtype_bytes: int, tensor_parallel: int = 1) -> int:
        """vLLM's KV cache per token on one GPU (key/value heads split over tensor-parallel ranks, at least one)."""
        return 2 * self.layers * math.ceil(self.kv_heads / tensor_parallel) * self.head_dim * dtype_bytes


QWEN2_5 = {
    # config.json of each Hugging Face Hub repository (hidden_size, num_hidden_layers, num_attention_heads,
    # num_key_value_heads, head_dim = hidden_size / num_attention_heads, intermediate_size, vocab_size,
    # tie_word_embeddings); their parameter counts, 1,543,714,304 / 7,615,616,512 / 14,770,033,664, are the model
    # cards' 1.54B / 7.61B / 14.7B
    "Qwen/Qwen2.5-1.5B-Instruct": ModelShape(1536, 28, 12, 2, 128, 8960, 151936, True),
    "Qwen/Qwen2.5-7B-Instruct": ModelShape(3584, 28, 28, 4, 128, 18944, 152064, False),
    "Qwen/Qwen2.5-14B-Instruct": ModelShape(5120, 48, 40, 8, 128, 13824, 152064, False),
}


def model_shape(path: str) -> ModelShape:
    """A local folder's config.json, else the built-in table of hub ids (nothing is downloaded)."""
    config = Path(path) / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        return ModelShape(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                          c.get("num_key_value_heads", c["num_attention_heads"]),
                          c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"], c["intermediate_size"],
                          c["vocab_size"], c.get("tie_word_embeddings", False))
    if path in QWEN2_5:
        return QWEN2_5[path]
    raise ConfigError(f"model.path {path!r}: no config.json there and not one of the hub ids whose shape is built "
                      f"in ({', '.join(QWEN2_5)})")


@dataclass(frozen=True)
class Part:
    what: str
    bytes: float
    on_cpu: bool = False


def dtype_bytes(cfg: JobConfig) -> int:
    return 2 if cfg.model.dtype == "bfloat16" else 4


def model_states(shape: ModelShape, lc: LearnerConfig, d: int) -> list[Part]:
    """Weights, gradients and optimizer states of one learner rank (the table in the module docstring); with LoRA
    the frozen weights, and the adapters' states by the table."""
    r, stage = lc.world_size, lc.zero_stage
    dt = "bf16" if d == 2 else "fp32"

    def split(partitioned: bool) -> tuple[int, str]:
        """The ranks a part is divided over, and the label that says so."""
        n = r if partitioned else 1
        return n, f" (1/{n})" if n > 1 else ""

    n, of = split(stage == 3)
    if lc.lora:
        parts = [Part(f"frozen weights, {dt}{of}", d * shape.params / n, lc.offload_params)]
        p, what = shape.adapter_params(lc.lora), "LoRA adapters' "
    else:
        parts, p, what = [], shape.params, ""
    parts.append(Part(f"{what}weights, {dt}{of}", d * p / n, lc.offload_params))
    if stage < 3 and not lc.offload_optimizer:
        n, of = split(stage == 2)
        parts.append(Part(f"{what}gradients, {dt}{of}", d * p / n))
    n, of = split(stage >= 1)
    if d != 4 or stage == 3 or lc.offload_optimizer:
        parts.append(Part(f"{what}fp32 gradients{of}", 4 * p / n, lc.offload_optimizer))
    if d != 4 or stage >= 1:
        parts.append(Part(f"{what}fp32 master weights{of}", 4 * p / n, lc.offload_optimizer))
    parts.append(Part(f"{what}Adam moments, fp32{of}", 8 * p / n, lc.offload_optimizer))
    if stage == 3:  # a frozen layer is gathered without gradients
        parts.append(Part(f"ZeRO-3 working set (largest layer gathered{'' if lc.lora else ', with its gradients'})",
                          (1 if lc.lora else 2) * d * shape.largest_layer))
    return parts


def layer_activation_bytes(shape: ModelShape, d: int, kv_len: int, lora: LoraConfig | None = None) -> float:
    """Bytes one decoder layer keeps for the backward, per token (formulas in the module docstring)."""
    h, q = shape.hidden, shape.heads * shape.head_dim
    k = q if shape.kv_heads > 1 else shape.head_dim
    full = 8 * h + 8 + d * (4 * h + 2 * q + 2 * k + 4 * shape.intermediate + kv_len) + 4 * shape.heads
    if lora is None:
        return full
    return full - 2 * d * h + sum(d * lora.r + (lora.dropout > 0) * (d + 1) * shape.projections[m][0]
                                  for m in lora.target_modules)


def saved_activation_bytes(shape: ModelShape, d: int, sequences: int, seq_len: int, logit_positions: int,
                           checkpointing: bool, lora: LoraConfig | None = None) -> float:
    """What autograd keeps after the forward of `sequences` x `seq_len` tokens with logits at `logit_positions`
    per sequence, through the loss's logsumexp."""
    tokens = sequences * seq_len
    layer = d * shape.hidden if checkpointing else layer_activation_bytes(shape, d, seq_len, lora)
    if lora is None:
        top = 8 + 4 * shape.hidden + 4 + 2 * d * shape.hidden  # token ids; final norm; lm_head input
    else:  # the final norm; without checkpointing, cancelled by layer 0's first norm, which keeps nothing
        top = 4 * shape.hidden + 4 if checkpointing else 0
    return tokens * (shape.layers * layer + top) + sequences * logit_positions * (4 * shape.vocab + 4)


def learner_parts(cfg: JobConfig, shape: ModelShape) -> list[Part]:
    """One learner rank: model states, the activations of one micro-batch, buffers (on CPU for a CPU learner)."""
    lc, rc, d = cfg.learner, cfg.rollout, dtype_bytes(cfg)
    b, seq = lc.micro_batch_size, rc.max_model_len
    completion = min(seq, rc.max_trajectory_tokens if cfg.task.tools else rc.max_new_tokens)
    ckpt = lc.gradient_checkpointing
    trained = shape.adapter_params(lc.lora) if lc.lora else shape.params
    parts = model_states(shape, lc, d) + [
        Part(f"activations ({b} x {seq} tokens{', checkpointed' if ckpt else ''}{', LoRA' if lc.lora else ''})",
             saved_activation_bytes(shape, d, b, seq, 0, ckpt, lc.lora)),
        Part(f"logits ({b} x {completion} completion tokens x {shape.vocab})",
             b * completion * (shape.vocab * (4 + 2 * d + 4) + 4)),
        Part("prompt keys/values repeated per completion",
             shape.layers * b * seq * 2 * shape.kv_heads * shape.head_dim * d),
        Part("DeepSpeed gradient bucket", min(REDUCE_BUCKET_ELEMENTS, trained) * d),
    ]
    if ckpt:
        parts.append(Part("one layer recomputed in the backward",
                          b * seq * layer_activation_bytes(shape, d, seq, lc.lora)))
    if cfg.grpo.kl_beta > 0 and not lc.lora:  # with LoRA the reference is the model with its adapters off
        n = lc.world_size if lc.zero_stage == 3 else 1
        parts.append(Part("reference model weights (grpo.kl_beta > 0)", d * shape.params / n))
    if lc.num_gpus == 0:
        return [Part(p.what, p.bytes, True) for p in parts]
    offloaded = sum(p.bytes for p in parts if p.on_cpu)
    if offloaded:
        parts.append(Part(f"pinned-buffer allowance (x{CPU_BUFFER_FACTOR:g} of the offloaded states)",
                          (CPU_BUFFER_FACTOR - 1) * offloaded, True))
    return parts + [Part("CUDA context, NCCL, allocator slack (allowance)", RUNTIME_BYTES)]


@dataclass(frozen=True)
class RolloutMemory:
    parts: list[Part]
    """Per GPU of the worker (in CPU memory for a CPU worker); on a GPU the KV cache is what the budget leaves."""
    budget: float
    """What vLLM claims of each of its GPUs (gpu_memory_utilization x the GPU), or its CPU KV cache space."""
    kv_have: float
    kv_need: float
    sequences: int
    """Sequences a worker samples at once: its share of a step's prompts x group_size (at most vLLM's max_num_seqs)."""


def rollout_memory(cfg: JobConfig, shape: ModelShape) -> RolloutMemory:
    rc, d, tp = cfg.rollout, dtype_bytes(cfg), cfg.rollout.tensor_parallel_size
    sequences = min(math.ceil(rc.prompts_per_step / rc.num_workers) * rc.group_size, VLLM_MAX_NUM_SEQS)
    kv_need = sequences * rc.max_model_len * shape.kv_bytes_per_token(d, tp)
    weights = Part(f"weights ({'bf16' if d == 2 else 'fp32'}{f', 1/{tp}' if tp > 1 else ''})",
                   d * shape.params / tp)
    if rc.num_gpus == 0:
        budget = rc.cpu_kvcache_gib * GIB  # VLLM_CPU_KVCACHE_SPACE: the KV cache alone; the weights come on top
        kv = Part("KV cache (rollout.cpu_kvcache_gib)", budget, True)
        return RolloutMemory([Part(weights.what, weights.bytes, True), kv], budget, budget, kv_need, sequences)
    budget = rc.gpu_memory_utilization * cfg.ray.cluster.gpu_memory_gib * GIB
    # a rough bound: the widest tensors of one layer's forward (hidden states and residual, the MLP's gate/up output
    # and their product) for the profiling batch, and the sampler's fp32 logits and probabilities
    h, inter = shape.hidden, shape.intermediate
    profile = Part("profiling pass: activations and sampler logits",
                   VLLM_MAX_NUM_BATCHED_TOKENS * d * (2 * h + 3 * inter) + VLLM_MAX_NUM_SEQS * shape.vocab * 8)
    runtime = Part("CUDA context, NCCL, CUDA graphs (allowance)", RUNTIME_BYTES)
    kv_have = budget - weights.bytes - profile.bytes - runtime.bytes
    kv = Part(f"KV cache ({max(0.0, kv_have) / shape.kv_bytes_per_token(d, tp) / 1e3:,.0f}k tokens)", max(0.0, kv_have))
    return RolloutMemory([weights, profile, runtime, kv], budget, kv_have, kv_need, sequences)
