"""Scoring a policy's sampled forecasts on a fixed question set, against the three reference levels."""

from __future__ import annotations

import numpy as np

from rollout.questions import Question
from rollout.scoring import entropy, expected_reward, log_score, reference_levels


def truth(questions: list[Question]) -> np.ndarray:
    """The best-known probability per question: p* for synthetic questions, else the market."""
    return np.array([q.p_true if q.p_true is not None else
                     (q.market_prob if q.market_prob is not None else np.nan) for q in questions], dtype=np.float64)


def summarize(questions: list[Question], forecasts: np.ndarray, mode: str = "market", eps: float = 0.01,
              penalty: float | None = None) -> dict:
    """forecasts: [questions, samples], NaN = unparseable. Rewards are expectations under the true probability."""
    p = truth(questions)
    if np.isnan(p).any():
        raise ValueError("summarize needs a known probability (p_true or market_prob) for every question")
    pp = np.broadcast_to(p[:, None], forecasts.shape)
    rew = expected_reward(pp, forecasts, mode, eps, penalty)
    parsed = ~np.isnan(forecasts)
    ce = -log_score(pp[parsed], forecasts[parsed], eps)
    levels = reference_levels(p, mode, eps)
    reward = float(rew.mean())
    return {
        "reward": reward,
        "ce": float(ce.mean()) if ce.size else float("nan"),
        "ce_minus_floor": float(ce.mean() - entropy(pp[parsed]).mean()) if ce.size else float("nan"),
        "format_fail_rate": float(1 - parsed.mean()),
        "skill": levels.skill(reward),
        "mean_abs_error": float(np.abs(forecasts[parsed] - pp[parsed]).mean()) if ce.size else float("nan"),
        **levels.as_dict(),
        "questions": len(questions),
        "samples": int(forecasts.size),
    }
