"""The whole job's configuration: typed, documented here and nowhere else.

A job is described by one YAML file (see `cluster/configs/`) plus `--set a.b=c` overrides. Unknown keys and wrong
types are errors that name the key and where it came from (the file or the `--set`). The resolved config is written
to the run folder, so a run can always be repeated from its own `config.yaml`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and its source."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    path: str = "models/tiny"
    """A local Hugging Face folder or a hub id (`Qwen/Qwen2.5-1.5B-Instruct` on a cluster)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype of the learner and of the vLLM engine. fp32 on CPU; bf16 on GPUs."""


class TaskConfig(_Strict):
    """What the model is asked and how its answers are scored (`rollout/task.py`)."""

    source: Literal["synthetic", "parquet"] = "synthetic"
    families: list[str] = ["dice"]
    """Synthetic families to train on (`rollout/synthetic.py`: dice, dice_sizes, two_dice, urn, coin, calc)."""
    split: Literal["train", "heldout", "all"] = "train"
    """Which family parameters to draw from; `heldout` are the parameters never trained on."""
    data: str | None = None
    """Parquet file of questions (schema: `rollout/questions.py`) when source is `parquet`."""
    train_before: str | None = None
    """Only questions with an as-of date before this date (ISO) are trained on; later ones are for evaluation."""
    reward: Literal["market", "outcome_log", "outcome_brier"] = "market"
    """market: -CE to the market / known probability; outcome_*: log or Brier score against the 0/1 outcome."""
    outcome_noise: float = Field(0.0, ge=0.0, le=0.5)
    """Synthetic only: std of the noise added to p* to make a noisy market (reward `market`)."""
    clip_eps: float = Field(0.01, gt=0.0, lt=0.5)
    """Forecasts are clipped to [clip_eps, 1 - clip_eps] before scoring."""
    format_penalty: float | None = None
    """Reward of an unparseable answer; default 2*log(clip_eps), below any parseable answer's log score."""
    reasoning: bool = False
    """False: the completion must be exactly `<answer>p</answer>`; True: the prompt asks for reasoning first and
    the last answer tag counts (raise rollout.max_new_tokens to match)."""
    mix: Literal["mixed", "one_family"] = "mixed"
    """Questions per step: drawn from all families, or all from one family chosen per step."""


class RolloutConfig(_Strict):
    num_workers: int = Field(1, ge=1)
    group_size: int = Field(8, ge=2)
    """G: completions sampled per question; advantages are relative within the group."""
    prompts_per_step: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(16, ge=1)
    max_model_len: int = Field(512, ge=16)
    tensor_parallel_size: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0.0)
    """Ray CPUs per worker; fractional on small machines so the job never waits for cores that don't exist."""
    num_gpus: float = Field(0.0, ge=0.0)
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    cpu_kvcache_gib: int = Field(1, ge=1)
    """VLLM_CPU_KVCACHE_SPACE on CPU."""
    cpu_cores: list[str] | None = None
    """CPU only: VLLM_CPU_OMP_THREADS_BIND per worker (e.g. ["0", "1"]); default: worker i on core i mod cores."""
    enforce_eager: bool = True


class GRPOConfig(_Strict):
    """The objective (`learner/grpo.py` has the formulas)."""

    normalize_std: bool = True
    """Divide advantages by the group's std (DeepSeekMath); off = Dr. GRPO style mean-centring only. With outcome
    rewards turn it off: it scales outcome noise up to full-size advantages and the forecasts become overconfident
    (ECE 0.25 vs 0.09 in bench/README.md)."""
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


class LearnerConfig(_Strict):
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
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    torch_threads: int | None = None
    """CPU only: torch threads per learner rank (default: what Ray gives the actor, at least 1)."""


class SyncConfig(_Strict):
    every: int = Field(1, ge=1)
    """Learner steps between weight broadcasts; the policy version bumps at each broadcast."""
    transport: Literal["object_store", "collective"] = "object_store"
    """object_store: ray.put of numpy arrays; collective: a gloo (CPU) / NCCL (GPU) broadcast group."""
    overlap: bool = False
    """Generate the next batch while the learner trains (one step of staleness), and let the weight broadcast run
    behind the next step. False with every=1 is on-policy. metrics.jsonl: sync_s is the driver's wait for the
    broadcast (near 0 with overlap), weight_load_s the rollout worker's load of the weights its batch used."""
    max_staleness: int = Field(0, ge=0)
    """No trajectory older than this many learner steps is trained on (late ones are dropped and counted)."""


class RunConfig(_Strict):
    name: str = "demo"
    out_dir: str = "runs"
    steps: int = Field(100, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    """Stop after this much wall time (counted from the first step), whatever `steps` says; then save and evaluate."""
    seed: int = 0
    save_every: int = Field(0, ge=0)
    """Checkpoint every N steps (0: only at the end)."""
    trajectories_every: int = Field(10, ge=0)
    """Write a step's trajectories to Parquet every N steps (0: never)."""
    eval_every: int = Field(0, ge=0)
    """Greedy-free sampled eval on held-out parameters every N steps (0: only before and after)."""
    eval_samples: int = Field(8, ge=1)
    """Samples per eval question."""
    progress: bool = True


class TimeoutConfig(_Strict):
    """Every remote wait is bounded; a timeout is an error that names the role that did not answer."""

    startup_s: float = Field(600.0, gt=0)
    generate_s: float = Field(600.0, gt=0)
    train_s: float = Field(600.0, gt=0)
    sync_s: float = Field(300.0, gt=0)
    save_s: float = Field(600.0, gt=0)
    connect_s: float = Field(30.0, gt=0)


class RayConfig(_Strict):
    address: str | None = None
    """Cluster to join; None uses RAY_ADDRESS if set, else starts a local Ray."""
    num_cpus: int | None = None
    """Local Ray only: CPUs to advertise (default: this machine's)."""


class JobConfig(_Strict):
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    rollout: RolloutConfig = RolloutConfig()
    grpo: GRPOConfig = GRPOConfig()
    learner: LearnerConfig = LearnerConfig()
    sync: SyncConfig = SyncConfig()
    run: RunConfig = RunConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "JobConfig":
        needed = (self.sync.every - 1) + int(self.sync.overlap)
        if self.sync.max_staleness < needed:
            raise ValueError(
                f"sync.max_staleness={self.sync.max_staleness} is below what sync.every={self.sync.every} and "
                f"sync.overlap={self.sync.overlap} produce ({needed}): every batch would be dropped")
        batch = self.rollout.prompts_per_step * self.rollout.group_size
        if batch % self.learner.world_size:
            raise ValueError(f"rollout.prompts_per_step * rollout.group_size = {batch} must divide evenly over "
                             f"learner.world_size = {self.learner.world_size}")
        if self.task.source == "parquet" and not self.task.data:
            raise ValueError("task.data must name a Parquet file when task.source is 'parquet'")
        if self.grpo.updates_per_batch > 1 and batch // self.learner.world_size < self.grpo.updates_per_batch:
            raise ValueError("grpo.updates_per_batch exceeds the sequences each learner rank gets per step")
        return self

    def ray_address(self) -> str | None:
        return self.ray.address or os.environ.get("RAY_ADDRESS") or None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        elif e["type"] == "missing":
            lines.append(f"{source}: missing key '{key}'")
        else:
            got = e.get("input")
            got = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{source}: {key}: {e['msg']}{got}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _set_path(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    model: type[BaseModel] | None = JobConfig
    node = tree
    for i, k in enumerate(keys):
        if model is None or k not in model.model_fields:
            raise ConfigError(f"invalid config:\n  {source}: unknown key '{'.'.join(keys[: i + 1])}'")
        ann = model.model_fields[k].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if i == len(keys) - 1:
            if model is not None:
                raise ConfigError(f"invalid config:\n  {source}: '{dotted}' is a section; set one of its keys")
            node[k] = value
        else:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"invalid config:\n  {source}: '{'.'.join(keys[: i + 1])}' is not a section")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> JobConfig:
    """Read a YAML config, apply `a.b=c` overrides, validate. Errors name the key and the file or `--set`."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        try:
            JobConfig.model_validate(tree)
        except ValidationError as e:
            raise ConfigError(_format_errors(e, str(p))) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None, f"--set {key.strip()}")
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, "--set" if overrides else str(path or "defaults"))) from None


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
