"""The training task: which questions are asked at each step and what each answer is scored against.

A question *instance* is one asking of a question at one step; its G completions form one GRPO group and share
one target: the market probability (for synthetic questions p*, or p* plus noise: a noisy market), or the outcome
(for synthetic questions one die roll drawn per instance: verifiable but noisy, the aleatoric case).
Draws depend only on (seed, step), so any step can be replayed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from rollout import questions as qio
from rollout import splits
from rollout import synthetic
from rollout.config import TaskConfig
from rollout.questions import Question
from rollout.scoring import Scorer


@dataclass(frozen=True)
class Instance:
    question: Question
    target: float
    group_id: int


def scorer(cfg: TaskConfig) -> Scorer:
    return Scorer(mode=cfg.reward, eps=cfg.clip_eps, penalty=cfg.format_penalty, strict=not cfg.reasoning)


def real_split(cfg: TaskConfig) -> splits.Split:
    """A Parquet task's questions: those it trains on (`task.data`, before `task.train_before` if set) and those it
    holds out (`task.eval_data`, else the rest of `task.data`), never one question on both sides."""
    pool = qio.read_parquet(cfg.data)
    parts = splits.time_split(pool, dt.date.fromisoformat(cfg.train_before)) if cfg.train_before else \
        splits.Split(pool, [])
    if cfg.eval_data:
        parts = splits.held_out(parts.train, [q for path in cfg.eval_data for q in qio.read_parquet(path)],
                                parts.removed)
    return parts


def load_pool(cfg: TaskConfig, split: str | None = None) -> list[Question]:
    """Questions this task can ask: for Parquet data the training questions (split "train", the default) or the
    held-out ones (any other split), only those with what the reward needs. With tools every question must have an
    as-of date (the date every call runs as of): one without is refused here, named."""
    if cfg.source == "synthetic":
        pool, where = synthetic.questions(cfg.families, split or cfg.split), f"task.families {cfg.families}"
    else:
        parts = real_split(cfg)
        train = (split or "train") == "train"
        need = "market_prob" if cfg.reward == "market" else "outcome"
        pool = [q for q in (parts.train if train else parts.eval) if getattr(q, need) is not None]
        where = f"the training questions ({cfg.data})" if train else \
            f"the held-out questions ({', '.join(cfg.eval_data) or cfg.data})"
        if train and not pool:
            raise ValueError(f"{cfg.data}: no training question has {need}, which task.reward={cfg.reward!r} scores "
                             "against")
    undated = [q.id for q in pool if q.as_of is None]
    if cfg.tools and undated:
        raise ValueError(f"task.tools: {len(undated)} of {where} have no as-of date, the date every tool call runs "
                         f"as of (first: {', '.join(undated[:5])}); give them one, or train without tools")
    return pool


def target_of(q: Question, cfg: TaskConfig, rng: np.random.Generator) -> float:
    if cfg.reward == "market":
        if q.p_true is not None and cfg.outcome_noise > 0:
            return float(np.clip(q.p_true + rng.normal(0.0, cfg.outcome_noise), 0.0, 1.0))
        return float(q.market_prob)
    if q.outcome is not None:
        return float(q.outcome)
    if q.p_true is None:
        raise ValueError(f"question {q.id} has no outcome to score against")
    return float(rng.random() < q.p_true)


class QuestionSampler:
    def __init__(self, cfg: TaskConfig, seed: int, pool: list[Question] | None = None):
        self.cfg, self.seed = cfg, seed
        self.pool = pool if pool is not None else load_pool(cfg)
        self.by_family: dict[str, list[Question]] = {}
        for q in self.pool:
            self.by_family.setdefault(synthetic.family_of(q), []).append(q)

    def step(self, step: int, n: int) -> list[Instance]:
        rng = np.random.default_rng([self.seed, step])
        if self.cfg.mix == "one_family":
            fams = sorted(self.by_family)
            pool = self.by_family[fams[rng.integers(len(fams))]]
        else:
            pool = self.pool
        picks = rng.integers(len(pool), size=n)
        return [Instance(pool[i], target_of(pool[i], self.cfg, rng), step * n + j) for j, i in enumerate(picks)]
