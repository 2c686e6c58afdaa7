"""The learner role's config sections: the GRPO objective and the DeepSpeed learner.

`cluster/config.py` composes them into the job's one typed config (`JobConfig`); `LearnerJob` is the part of it a
learner rank reads.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rollout.config import ModelConfig, TaskConfig
from tools.config import Strict


class GRPOConfig(Strict):
    """The objective (`learner/grpo.py` has the formulas)."""

    normalize_std: bool = True
    """Divide advantages by the group's std (DeepSeekMath); off = Dr. GRPO style mean-centring only. With outcome
    rewards turn it off: it scales outcome noise up to full-size advantages and the forecasts become overconfident
    (ECE 0.25 vs 0.09 in bench/README.md). Likewise where the questions' stakes differ (real markets, most near 0,
    a few high): divided by its own std every group pushes alike whatever it stands to gain, so a constant answer
    drifts to the targets' median instead of their mean, the cross entropy's optimum (tests/test_grpo_math.py; on
    ForecastBench's training markets the median is 0.105, the mean 0.24)."""
    format_aware: bool = False
    """Baseline and scale from a group's parseable answers; an unparseable one gets the group's lowest advantage
    minus one unit (see learner/grpo.py)."""
    clip_eps_low: float = Field(0.2, ge=0.0)
    clip_eps_high: float = Field(0.28, ge=0.0)
    tis_cap: float | None = Field(2.0, gt=0.0)
    """Truncated importance sampling: per-token weight min(pi_learner / pi_sampler, cap); None turns it off."""
    kl_beta: float = Field(0.0, ge=0.0)
    """Weight of the k3 KL to a frozen reference (the starting model); 0 loads no reference model."""
    kl_skip_unparsed: bool = False
    """Exempt unparseable completions from the KL term. The k3 gradient on a sampled token the policy has made
    rarer than the reference pushes it back up: with the anchor on, the warm start's junk tokens keep coming back."""
    kl_beta_end: float | None = Field(None, ge=0.0)
    """If set, the KL weight goes linearly from kl_beta at the first step to this at the last (run.steps)."""
    loss_agg: Literal["token-mean", "seq-mean"] = "token-mean"
    updates_per_batch: int = Field(1, ge=1)
    """Optimizer steps per trajectory batch (mini-batches); >1 costs one extra forward pass for old logprobs."""
    entropy_coef: float = Field(0.0, ge=0.0)
    """Bonus on the policy's token entropy (keeps a group's samples diverse)."""


class LoraConfig(Strict):
    """LoRA (Hu et al. 2021, arXiv:2106.09685) through `peft`: each targeted projection W is trained as
    W + (alpha / r) * B A, with A (r x in) and B (out x r) the only trained weights and W frozen (`learner/lora.py`).
    B starts at 0, so training starts from the model itself; A starts from run.seed, so two runs of one config start
    alike."""

    r: int = Field(16, ge=1)
    """Rank of the adapters: trained parameters per projection r x (in + out)."""
    alpha: float = Field(32.0, gt=0.0)
    """Scale: the update is (alpha / r) B A, so a change of r needs no change of learner.lr at the same alpha / r."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input in training passes only. 0 by default: with it, the logprobs the loss is taken
    on are of a randomly thinned model, not the policy the sampler drew from (the importance weights get noisier)."""
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                      min_length=1)
    """Names of the linear layers that get adapters (peft matches the last part of each module's name): by default
    every attention and MLP projection of Llama, Qwen2/2.5/3 and SmolLM2, which trains better than attention alone
    (the QLoRA paper's finding, arXiv:2305.14314); the embeddings and lm_head stay frozen."""


class LearnerConfig(Strict):
    world_size: int = Field(1, ge=1)
    zero_stage: int = Field(0, ge=0, le=3)
    lr: float = Field(1e-4, gt=0.0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, gt=0.0)
    micro_batch_size: int = Field(64, ge=1)
    """Sequences per forward/backward; gradients accumulate over a step's micro-batches."""
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False
    """ZeRO-Offload: the fp32 master weights, fp32 gradients and Adam moments live in (pinned) CPU memory and the
    optimizer steps on the CPU; the GPU keeps the bf16 weights. For a learner whose optimizer states do not fit its
    GPUs (`forecast-grpo plan` says); steps get slower. Needs zero_stage 1-3."""
    offload_params: bool = False
    """ZeRO-Infinity's parameter offload: the weight partitions live in CPU memory too, fetched layer by layer for
    each forward and backward. Needs zero_stage 3."""
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    torch_threads: int | None = None
    """CPU only: torch threads per learner rank (default: what Ray gives the actor, at least 1)."""
    lora: LoraConfig | None = None
    """Train LoRA adapters on the frozen model instead of every weight (null, the default: off). On with
    `--set learner.lora.r=16` (any of its keys) or a `lora:` mapping (`lora: {}` for the defaults). Only the adapters
    get gradients and Adam moments; the KL's reference is the same model with its adapters off (no second copy); the
    engines get the merged weights at every sync, and a checkpoint holds the adapter (`adapter/`, peft's format) and
    the merged Hugging Face folder. Every zero_stage works: 0-2 keep the frozen weights whole on each rank, 3
    partitions them too (and gathers each adapted layer with its adapters to merge it)."""

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "LearnerConfig":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"learner.offload_params needs learner.zero_stage 3 (got {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("learner.offload_optimizer needs learner.zero_stage 1, 2 or 3 (got 0)")
        return self


class LearnerJob(Strict):
    """What a learner rank needs to know of the job (`JobConfig.learner_job()` builds it)."""

    model: ModelConfig
    learner: LearnerConfig
    grpo: GRPOConfig
    task: TaskConfig
    """For the step metrics: the reward mode and clipping the rollout scored with."""
    temperature: float
    """rollout.temperature: the learner's logprobs are of the distribution the sampler drew from."""
    max_staleness: int
    """sync.max_staleness."""
    total_steps: int
    """run.steps: the length of the lr and KL schedules."""
    trajectories_every: int
    """run.trajectories_every."""
    seed: int
    """run.seed: the LoRA adapters' initialisation."""
