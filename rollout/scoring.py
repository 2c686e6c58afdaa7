"""Answer parsing, proper scores, and the reference levels learning is reported against.

Rewards (q is the forecast clipped to [eps, 1 - eps]):

    market        r = p_m log q + (1 - p_m) log(1 - q)      = -CE(p_m, q); its maximum, at q = p_m, is -H(p_m)
    outcome_log   r = o log q + (1 - o) log(1 - q)          (log score of the 0/1 outcome o)
    outcome_brier r = -(q - o)^2                            (negated Brier score)

An unparseable answer gets the format penalty: 2 log eps for the log scores (below every parseable answer), -1 for
Brier. Reported beside the reward: -KL(p || q) = r + H(p), which is zero at the optimum.

Reference levels for a question mix with targets p_i (the market probability or the known p*):

    entropy floor   mean_i -H(p_i)                       what a forecaster answering p_i itself gets
    best constant   mean_i score(p_i, q_c), q_c = mean p the best answer that ignores the question
    random          mean_i mean_{q in 0.01..0.99} score(p_i, q)   a uniformly random answer

Skill = (R - R_constant) / (R_floor - R_constant): 0 for the best constant forecaster, 1 for p* itself.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

_NUM = r"([0-9]*\.?[0-9]+(?:\s*/\s*[0-9]+)?)"
_TAG = re.compile(r"<answer>\s*" + _NUM + r"\s*</answer>")
_ANY_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)


def parse_answer(text: str, strict: bool = True) -> float | None:
    """The forecast in [0, 1], or None.

    strict: the whole completion (surrounding whitespace ignored) must be one `<answer>p</answer>`;
    otherwise reasoning may come first and the last answer tag counts. p is a decimal or a fraction a/b.
    """
    if strict:
        m = _TAG.fullmatch(text.strip())
        if m is None:
            return None
        raw = m.group(1)
    else:
        tags = _ANY_TAG.findall(text)
        if not tags:
            return None
        m = re.fullmatch(r"\s*" + _NUM + r"\s*", tags[-1])
        if m is None:
            return None
        raw = m.group(1)
    s = raw.replace(" ", "").replace("\t", "").replace("\n", "")
    try:
        if "/" in s:
            a, b = s.split("/")
            q = float(a) / float(b)
        else:
            q = float(s)
    except (ValueError, ZeroDivisionError):
        return None
    if math.isnan(q) or not 0.0 <= q <= 1.0:
        return None
    return q


ANSWER_PATTERN = r"<answer>0\.[0-9]{1,3}</answer>"
"""`task.answer: constrained`: the answer a turn is constrained to (vLLM structured outputs); always parses."""


def answer_pattern(reasoning: bool) -> str:
    """The whole turn: the answer alone, or (reasoning) text without '<' and then the answer."""
    return f"[^<]*{ANSWER_PATTERN}" if reasoning else ANSWER_PATTERN


def log_score(p, q, eps: float = 0.01):
    """p log q + (1-p) log(1-q) with q clipped; p may be a market probability or a 0/1 outcome. Works on arrays."""
    q = np.clip(q, eps, 1.0 - eps)
    return p * np.log(q) + (1.0 - p) * np.log1p(-q)


def brier_score(o, q, eps: float = 0.01):
    """Negated Brier score (higher is better), so all rewards are maximised."""
    q = np.clip(q, eps, 1.0 - eps)
    return -((q - o) ** 2)


def entropy(p):
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log(p) + (1 - p) * np.log1p(-p))
    return np.where((p <= 0) | (p >= 1), 0.0, h)


def default_penalty(mode: str, eps: float) -> float:
    return -1.0 if mode == "outcome_brier" else 2.0 * math.log(eps)


@dataclass(frozen=True)
class Scorer:
    """Turns a completion's text and a question's target into a reward."""

    mode: str = "market"
    eps: float = 0.01
    penalty: float | None = None
    strict: bool = True

    @property
    def format_penalty(self) -> float:
        return default_penalty(self.mode, self.eps) if self.penalty is None else self.penalty

    def __call__(self, text: str, target: float) -> tuple[float, float | None]:
        """(reward, parsed forecast or None). `target` is p_m for `market`, the outcome for the outcome modes."""
        q = parse_answer(text, self.strict)
        if q is None:
            return self.format_penalty, None
        if self.mode == "outcome_brier":
            return float(brier_score(target, q, self.eps)), q
        return float(log_score(target, q, self.eps)), q


@dataclass(frozen=True)
class ReferenceLevels:
    random: float
    constant: float
    floor: float
    constant_answer: float

    def skill(self, reward: float) -> float:
        gap = self.floor - self.constant
        return float("nan") if gap <= 0 else (reward - self.constant) / gap

    def as_dict(self) -> dict:
        return {"ref_random": self.random, "ref_constant": self.constant, "ref_floor": self.floor,
                "ref_constant_answer": self.constant_answer}


def _expected(p, q, mode: str, eps: float):
    """Expected reward of a parseable forecast q when the truth is p. For the outcome modes the expectation is over
    o ~ Bernoulli(p): the log score's is the market formula; the Brier score's is -(q - p)^2 - p(1 - p), with q
    clipped as the reward clips it."""
    if mode == "outcome_brier":
        return -((np.clip(q, eps, 1 - eps) - p) ** 2) - p * (1 - p)
    return log_score(p, q, eps)


def reference_levels(targets, mode: str = "market", eps: float = 0.01) -> ReferenceLevels:
    """Expected reward of the three reference forecasters on a question mix with true probabilities `targets`.

    The floor is p itself, clipped as every forecast is: under a proper score the best clipped answer is clip(p).
    """
    p = np.asarray(targets, dtype=np.float64)
    if p.size == 0:
        raise ValueError("reference levels need at least one question")
    qc = float(np.clip(p.mean(), eps, 1 - eps))
    grid = np.arange(1, 100) / 100.0
    return ReferenceLevels(
        random=float(np.mean([np.mean(_expected(p, q, mode, eps)) for q in grid])),
        constant=float(np.mean(_expected(p, qc, mode, eps))),
        floor=float(np.mean(_expected(p, np.clip(p, eps, 1 - eps), mode, eps))),
        constant_answer=qc,
    )


def expected_reward(p, q, mode: str = "market", eps: float = 0.01, penalty: float | None = None):
    """Noise-free reward of forecasts q (NaN = unparseable) on questions with true probability p."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    ok = ~np.isnan(q)
    out = np.full(p.shape, default_penalty(mode, eps) if penalty is None else penalty)
    return np.where(ok, _expected(p, np.where(ok, q, 0.5), mode, eps), out)
