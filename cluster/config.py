"""The whole job's configuration: one typed, documented config.

Each role's sections are defined with the role (`rollout/config.py`: model, task, rollout; `learner/config.py`:
grpo, learner; `tools/config.py`: tools); the sections that wire the roles together (sync, run, timeouts, ray) are
here, and `JobConfig` composes them all. A job is described by one YAML file (see `cluster/configs/`) plus
`--set a.b=c` overrides. Unknown keys and wrong types are errors that name the key and where it came from (the
file or the `--set`). The resolved config is written to the run folder, so a run can always be repeated from its
own `config.yaml`.
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from learner.config import GRPOConfig, LearnerConfig, LearnerJob
from model.config import WarmstartConfig
from rollout.config import ModelConfig, RolloutConfig, RolloutJob, TaskConfig
from tools.config import Strict, ToolsConfig


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and its source."""


class SyncConfig(Strict):
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


class RunConfig(Strict):
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
    eval_max_questions: int | None = Field(None, ge=1)
    """Evaluate on a fixed random subset of this many questions per set (None: all of them)."""
    eval_batch_questions: int = Field(8, ge=1)
    """Questions per evaluation call to a rollout worker (and per call to the engine of `forecast-grpo eval`). Each
    call moves the progress on and is awaited for at most `timeouts.generate_s`, so an evaluation takes as long as
    its work needs: size it so one call takes tens of seconds (questions x eval_samples x max_new_tokens tokens at
    the engine's speed: about 50 tokens/s for SmolLM2-135M on a 2-core laptop, 325 times that for the tiny model)."""
    progress: bool = True
    """Progress bars on stderr: the training steps, and each evaluation (questions done, samples/s, ETA)."""


class TimeoutConfig(Strict):
    """Every remote wait is bounded; a timeout is an error that names the role that did not answer."""

    startup_s: float = Field(600.0, gt=0)
    generate_s: float = Field(600.0, gt=0)
    """A worker's share of a step's generation, and one evaluation call (`run.eval_batch_questions` questions)."""
    train_s: float = Field(600.0, gt=0)
    sync_s: float = Field(300.0, gt=0)
    save_s: float = Field(600.0, gt=0)
    connect_s: float = Field(30.0, gt=0)


class ClusterHardware(Strict):
    """The nodes `forecast-grpo plan` places the job on and checks its memory against (`cluster/placement.py`,
    `cluster/memory.py`); the KubeRay manifests request the same. Nodes are alike. Ray itself is not told."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=0)
    gpu_memory_gib: float = Field(79.0, gt=0)
    """One GPU's memory as CUDA reports it: an "80 GB" A100 or H100 reports 79-80 GiB."""
    cpus_per_node: float = Field(64.0, gt=0)
    """Ray CPUs a node advertises (a KubeRay pod's CPU limit)."""
    cpu_memory_gib: float = Field(512.0, gt=0)
    """Host memory of a node (a KubeRay pod's memory limit): offloaded optimizer states and CPU-only roles."""


class RayConfig(Strict):
    address: str | None = None
    """Cluster to join; None uses RAY_ADDRESS if set, else starts a local Ray."""
    num_cpus: int | None = None
    """Local Ray only: CPUs to advertise (default: this machine's)."""
    dashboard: bool = False
    """Local Ray only: start the Ray dashboard too (its URL is printed; the training metrics show there)."""
    cluster: ClusterHardware = ClusterHardware()


class JobConfig(Strict):
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    rollout: RolloutConfig = RolloutConfig()
    grpo: GRPOConfig = GRPOConfig()
    learner: LearnerConfig = LearnerConfig()
    sync: SyncConfig = SyncConfig()
    run: RunConfig = RunConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    ray: RayConfig = RayConfig()
    tools: ToolsConfig = ToolsConfig()
    warmstart: WarmstartConfig = WarmstartConfig()

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
        if self.task.source != "parquet" and (self.task.eval_data or self.task.train_before):
            raise ValueError("task.eval_data and task.train_before split real questions: they need task.source "
                             "'parquet' (synthetic families hold out their own parameters: task.split)")
        if self.grpo.updates_per_batch > 1 and batch // self.learner.world_size < self.grpo.updates_per_batch:
            raise ValueError("grpo.updates_per_batch exceeds the sequences each learner rank gets per step")
        return self

    def rollout_job(self) -> RolloutJob:
        return RolloutJob(model=self.model, task=self.task, rollout=self.rollout, tools=self.tools, seed=self.run.seed)

    def learner_job(self) -> LearnerJob:
        return LearnerJob(model=self.model, learner=self.learner, grpo=self.grpo, task=self.task,
                          temperature=self.rollout.temperature, max_staleness=self.sync.max_staleness,
                          total_steps=self.run.steps, trajectories_every=self.run.trajectories_every,
                          seed=self.run.seed)

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


def _section(annotation) -> tuple[type[BaseModel] | None, bool]:
    """The config section a key holds (None: a plain value), and whether it is an optional one (`Section | None`,
    such as learner.lora: null is off, and setting any of its keys turns it on)."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    sections = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
    return (sections[0] if sections else None), type(None) in options


def _set_path(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    model: type[BaseModel] | None = JobConfig
    node = tree
    for i, k in enumerate(keys):
        if model is None or k not in model.model_fields:
            raise ConfigError(f"invalid config:\n  {source}: unknown key '{'.'.join(keys[: i + 1])}'")
        model, optional = _section(model.model_fields[k].annotation)
        if i == len(keys) - 1:
            if model is not None and not (optional and value is None):
                raise ConfigError(f"invalid config:\n  {source}: '{dotted}' is a section; set one of its keys"
                                  + (" (or null: off)" if optional else ""))
            node[k] = value
        else:
            if optional and node.get(k) is None:  # an optional section that was off: setting a key turns it on
                node[k] = {}
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
