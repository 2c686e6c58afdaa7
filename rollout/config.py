"""The rollout role's config sections: the model, the task, and how rollout workers sample.

`cluster/config.py` composes these, the learner's and the tools' sections into the job's one typed config
(`JobConfig`); `RolloutJob` is the part of it a rollout worker reads.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tools.config import Strict, ToolsConfig


class ModelConfig(Strict):
    path: str = "models/tiny"
    """A local Hugging Face folder or a hub id (`Qwen/Qwen2.5-1.5B-Instruct` on a cluster)."""
    build_tiny: bool = False
    """The driver builds the tiny model (`model/tiny.py`: deterministic from its seed, about 4 minutes on 2 cores) at
    `path` before anything starts if nothing is there (what is there is used, whatever it is): how `ray job submit`
    runs the demo (`cluster.train.build_missing`)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype of the learner and of the vLLM engine. fp32 on CPU; bf16 on GPUs."""
    chat_template: str | None = None
    """A Jinja file that replaces the tokenizer's chat template (None: the model's own)."""
    tool_parser: str = "auto"
    """With tools: the vLLM tool parser that reads the model's calls (`vllm/tool_parsers/`: hermes for Qwen2.5 and
    Qwen3, lfm2, llama3_json, ...); auto picks it from the chat template (`rollout/chat_format.py`)."""
    tool_prompt: Literal["template", "hermes_system"] = "template"
    """With tools: how the schemas reach the model. template: the chat template's own layout (`tools=`; a template
    that ignores them is refused). hermes_system: a system message in Qwen2.5's `# Tools` layout, calls written as
    `<tool_call>{json}</tool_call>` and read by the hermes parser: for a template without tools (SmolLM2's)."""


class TaskConfig(Strict):
    """What the model is asked and how its answers are scored (`rollout/task.py`)."""

    source: Literal["synthetic", "parquet"] = "synthetic"
    families: list[str] = ["dice"]
    """Synthetic families to train on (`rollout/synthetic.py`: dice, dice_sizes, two_dice, urn, coin, calc)."""
    split: Literal["train", "heldout", "all"] = "train"
    """Which family parameters to draw from; `heldout` are the parameters never trained on."""
    data: str | None = None
    """Parquet file of questions (schema: `rollout/questions.py`) when source is `parquet`."""
    train_before: str | None = None
    """Only questions of `data` with an as-of date before this date (ISO) are trained on; the later ones are the
    held-out set (unless `eval_data` names one). A question on both sides is dropped from the held-out side
    (`rollout/splits.py`)."""
    eval_data: list[str] = []
    """Parquet files of held-out questions (one file or a list), evaluated before training, every `run.eval_every`
    steps and at the end. A question that shares its id or its text with a training question is dropped from them,
    and counted. [] with `train_before`: the later questions of `data`; [] without it: no held-out evaluation."""
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
    answer: Literal["free", "constrained"] = "free"
    """free: the model writes what it likes and an answer out of format gets the format penalty. constrained: every
    answer turn is constrained to the format (`scoring.answer_pattern`, vLLM structured outputs), so every answer
    parses: for a model that does not write the format yet (the other way: `forecast-grpo warmstart`). With tools a
    turn is then a call (Hermes format) or an answer. The learner's truncated importance weights correct for the
    constrained sampler, as for `tool_choice: required`."""
    mix: Literal["mixed", "one_family"] = "mixed"
    """Questions per step: drawn from all families, or all from one family chosen per step."""
    tools: list[Literal["wiki", "wiki_search", "news"]] = []
    """Tools the model may call (their schemas go to the chat template): `wiki` (a page as it stood on the as-of
    date), `wiki_search` (the titles that existed then, with what they said then), `news` (dated news summaries up
    to the as-of date). Every call's date is the question's as-of date, never the model's. [] = single-turn
    forecasts."""
    tool_error_penalty: float = Field(0.0, ge=0.0)
    """Subtracted from a trajectory's reward for each bad tool call (invalid JSON, unknown tool, bad arguments,
    too many calls); 0 = the error message is the only consequence."""
    tool_choice: Literal["auto", "required"] = "auto"
    """auto: the model calls a tool or answers, as it likes. required: the first turn of every conversation is a
    tool call: decoding is constrained to the call format (`ChatFormat.call_pattern`), and the model picks the tool
    and its arguments within it. For a model that does not call on its own yet. The sampler's logprobs are then
    those of the constrained distribution; the learner's truncated importance weights (`grpo.tis_cap`, on by
    default) correct for it."""

    @field_validator("eval_data", mode="before")
    @classmethod
    def _one_or_more(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> "TaskConfig":
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("task.tool_choice 'required' needs task.tools: there is no tool to call")
        return self


class RolloutConfig(Strict):
    num_workers: int = Field(1, ge=1)
    group_size: int = Field(8, ge=2)
    """G: completions sampled per question; advantages are relative within the group."""
    prompts_per_step: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(16, ge=1)
    max_model_len: int = Field(512, ge=16)
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs (on CPU: cores) per engine; above 1 the engine runs one process per rank (vLLM's multiprocess
    executor), and the placement gives a worker its ranks' GPUs on one node (`forecast-grpo plan`)."""
    num_cpus: float = Field(0.5, ge=0.0)
    """Ray CPUs per worker; fractional on small machines so the job never waits for cores that don't exist."""
    num_gpus: float = Field(0.0, ge=0.0)
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    cpu_kvcache_gib: int = Field(1, ge=1)
    """VLLM_CPU_KVCACHE_SPACE on CPU."""
    cpu_cores: list[str] | None = None
    """CPU only: VLLM_CPU_OMP_THREADS_BIND per worker (e.g. ["0", "1"]; a core per tensor-parallel rank: ["0|1"]);
    default: worker i's ranks on the next cores in turn."""
    enforce_eager: bool = True
    max_turns: int = Field(4, ge=1)
    """With tools: assistant turns per trajectory; the last one must answer (a tool call there ends it unanswered)."""
    max_tool_calls: int = Field(4, ge=0)
    """With tools: calls per trajectory; further calls get an error message as their response."""
    max_trajectory_tokens: int = Field(1024, ge=16)
    """With tools: model and tool tokens after the prompt, all turns together; beyond it the trajectory is cut
    (truncated, counted by reason)."""
    max_tool_response_tokens: int = Field(256, ge=16)
    """A tool response is cut to this many tokens before it enters the conversation."""
    max_restarts: int = Field(3, ge=-1)
    """Times Ray restarts a rollout worker that died (-1: always); the driver gives it the current weights and has it
    generate its share of the step again. 0: a dead worker ends the job."""
    trajectory_timeout_s: float = Field(120.0, gt=0)
    """With tools: wall-clock deadline of one trajectory. A straggler is cut (reason: deadline) and, being no answer
    of the model's (slow tools are no bad answer), dropped from its group and counted (`dropped_deadline`), never
    scored."""
    deterministic_turns: bool = False
    """With tools: the calls of every turn that ends in an engine step are all answered before the engine's next
    step, and the next turns go in in conversation order, so the engine sees the same requests in the same order
    (and draws its random numbers in that order: `engine.reseed`) whatever the tools' latency. With fixed answers
    (an offline snapshot) a run is then repeatable and a resumed run exact. It costs the engine the wait for the
    slowest answer at each such step: nothing measurable on a cache (bench/README.md, "Multi-turn cost"), seconds
    on a live upstream. False: a turn goes in as soon as its answers are read, while the engine decodes the others."""


class RolloutJob(Strict):
    """What a rollout worker needs to know of the job (`JobConfig.rollout_job()` builds it)."""

    model: ModelConfig
    task: TaskConfig
    rollout: RolloutConfig
    tools: ToolsConfig
    seed: int
