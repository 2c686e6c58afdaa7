"""The model role's config section: the format warm start (`model/warmstart.py`, `forecast-grpo warmstart`).

`cluster/config.py` composes it into the job's one typed config (`JobConfig`) as the `warmstart:` section.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tools.config import Strict


class WarmstartConfig(Strict):
    """A short supervised warm start on the answer format (and, with tools, the call format) before GRPO: the job's
    own prompts in the model's own template, answered `<answer>p</answer>` with p drawn uniformly, independent of the
    question, so the model learns to answer in format and nothing about the truth."""

    base: str | None = None
    """The model to warm-start (a Hugging Face folder or hub id); the result is written to `model.path`, which must
    be another folder. None: no warm start."""
    steps: int = Field(40, ge=1)
    """Optimizer steps. 40 steps of 8 took SmolLM2-135M on dice from 0 to 32 of 32 sampled answers in format
    (temperature 1), in 234 s on a 2-core laptop shared with other jobs. Its loss is at 0.42 from about step 10 on:
    the floor, ln(99) over the answer's 11 tokens, as the forecast is uniform and there is nothing more to learn."""
    batch_size: int = Field(8, ge=1)
    """Examples per step, each a question drawn from the task's training pool."""
    lr: float = Field(5e-5, gt=0)
    """AdamW's learning rate, constant. SmolLM2-135M on dice learns the format in a few steps at 5e-5 or 1e-4: 6 steps
    of 4 took it from 0 to 8 of 8 sampled answers in format, at either rate and for every seed tried."""
    forecasts: Literal["uniform", "opinion", "base_rate"] = "uniform"
    """The forecasts in the targets, never informed by the truth. uniform: drawn afresh for every example. opinion: a
    belief per question, a keyed hash of its text (the same whenever it is asked, unrelated to the truth), answered
    within +- `opinion_spread` of it: the model learns to answer *the question*, as a pretrained model has an opinion
    about each; with uniform targets the answer may come to ignore the question, and GRPO then has to teach it to
    look (model/tiny.py found this for the tiny model). base_rate: the training questions' mean target (market
    probability, else p*) for every question, give or take `opinion_spread`: nothing about any one question, but GRPO
    starts at the best constant instead of spending its first steps finding it (on ForecastBench, where most
    markets sit below 0.3, uniform answers start at a mean of 0.5)."""
    opinion_spread: float = Field(0.15, ge=0.0, le=0.5)
    """With `forecasts: opinion` or `base_rate`: the half-width of the answers around the belief."""
    seed: int = 0
    """Seeds the questions, the forecasts, which examples call a tool, the measured samples and torch."""
    tool_call_rate: float = Field(0.7, ge=0.0, le=1.0)
    """With `task.tools`: the share of examples that call a tool (in the model's own call format, run through the
    real tool service, the result rendered as the rollout renders it) before answering; the rest answer at once.
    Tool results are cut to `rollout.max_tool_response_tokens`."""
    measure: int = Field(16, ge=0)
    """Answers sampled (one per prompt, at the rollout's temperature and top_p) before and after, to report the share
    in format in `warmstart.json`; with tools, a well-formed call counts too and the two shares are reported apart.
    0: skip."""
