"""Scoring a policy's sampled forecasts on a fixed question set: against the three reference levels (`summarize`,
for questions with a known probability), and beside baseline forecasters and other systems' published forecasts
(`align_forecasts`) on real questions (`score_forecasts`: cross-entropy to the market, log and Brier scores on resolved
questions, ECE, sharpness)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rollout.calibration import ece, sharpness
from rollout.questions import Question
from rollout.scoring import brier_score, default_penalty, expected_reward, log_score, reference_levels


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
        # the floor is the CE of clip(p): forecasts are clipped, so a market at 0.0005 cannot be matched exactly
        "ce_minus_floor": float((ce + log_score(pp[parsed], np.clip(pp[parsed], eps, 1 - eps), eps)).mean())
        if ce.size else float("nan"),
        "format_fail_rate": float(1 - parsed.mean()),
        "skill": levels.skill(reward),
        "mean_abs_error": float(np.abs(forecasts[parsed] - pp[parsed]).mean()) if ce.size else float("nan"),
        # every sampled answer against its question's true probability (a soft target)
        "ece": ece(forecasts[parsed], pp[parsed]) if ce.size else float("nan"),
        "sharpness": sharpness(forecasts[parsed]),
        # does the policy answer the question or the base rate? (a constant forecaster has one value here)
        "mean_forecast_by_truth": {f"{t:.3f}": float(np.nanmean(forecasts[p == t])) if parsed[p == t].any()
                                   else None for t in np.unique(p)},
        **levels.as_dict(),
        "questions": len(questions),
        "samples": int(forecasts.size),
    }


# ------------------------------------------------------------------ comparing forecasters on real questions
# The policy's forecast for a question is the mean of its parsed samples (a linear pool of its beliefs). Everything
# is scored as the rewards score it, forecasts clipped to [eps, 1 - eps]. A question with no parsed sample gets the
# format penalty (log scores 2 log eps, Brier 1), so failing to answer never looks better than a bad answer.


def point_forecasts(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """samples [questions, n], NaN = unparseable -> per question: mean, median (NaN where none parsed), fail share."""
    samples = np.asarray(samples, dtype=np.float64)
    parsed = ~np.isnan(samples)
    n_ok = parsed.sum(axis=1)
    mean = np.where(n_ok > 0, np.where(parsed, samples, 0.0).sum(axis=1) / np.maximum(n_ok, 1), np.nan)
    median = np.full(len(samples), np.nan)
    for i in np.flatnonzero(n_ok):
        median[i] = np.median(samples[i, parsed[i]])
    return mean, median, 1.0 - n_ok / samples.shape[1]


def base_rate(questions: list[Question]) -> tuple[float, str]:
    """The best constant answer learnable from these questions: the outcome frequency, else the mean known p."""
    outcomes = [q.outcome for q in questions if q.outcome is not None]
    if outcomes:
        return float(np.mean(outcomes)), f"mean outcome of {len(outcomes)} resolved questions"
    p = truth(questions)
    p = p[~np.isnan(p)]
    if not p.size:
        raise ValueError("no question has an outcome, a market probability or p_true to take a base rate from")
    return float(p.mean()), f"mean probability of {p.size} questions (none resolved)"


def baselines(questions: list[Question], rate: float | None) -> dict[str, np.ndarray]:
    """Reference forecasters: always 0.5, the training base rate (if known), and the market (NaN where none)."""
    n = len(questions)
    out = {"always 0.5": np.full(n, 0.5)}
    if rate is not None:
        out["base rate"] = np.full(n, rate)
    out["market"] = np.array([np.nan if q.market_prob is None else q.market_prob for q in questions])
    return out


def align_forecasts(questions: list[Question], forecasts: dict[str, float]) -> np.ndarray:
    """Another system's forecasts by question id -> one per question, NaN where it gave none. Score them with
    missing="skip": a comparison is fair only on the questions the system forecast (`n` in the table says how many)."""
    return np.array([forecasts.get(q.id, np.nan) for q in questions], dtype=np.float64)


def score_forecasts(questions: list[Question], forecast: np.ndarray, eps: float = 0.01, bins: int = 10,
                    missing: str = "penalty") -> dict:
    """Point forecasts (one per question) against the market and the outcomes.

    missing: what a NaN forecast means. "penalty": the model gave no parseable answer, scored with the format
    penalty; "skip": the forecaster has nothing to say there (the market on questions without one), left out.
    """
    if missing not in ("penalty", "skip"):
        raise ValueError(f"missing must be 'penalty' or 'skip', not {missing!r}")
    q = np.asarray(forecast, dtype=np.float64)
    if q.shape != (len(questions),):
        raise ValueError(f"{q.shape} forecasts for {len(questions)} questions")
    has = ~np.isnan(q)
    scored = has if missing == "skip" else np.ones_like(has)
    market = np.array([np.nan if x.market_prob is None else x.market_prob for x in questions])
    outcome = np.array([np.nan if x.outcome is None else x.outcome for x in questions], dtype=np.float64)
    pen = default_penalty("market", eps)
    qq = np.where(has, q, 0.5)
    m = scored & ~np.isnan(market)
    r = scored & ~np.isnan(outcome)
    ce = np.where(has, -log_score(market, qq, eps), -pen)[m]
    logs = np.where(has, log_score(outcome, qq, eps), pen)[r]
    brier = np.where(has, -brier_score(outcome, qq, eps), 1.0)[r]
    out = {
        "questions": int(scored.sum()),
        "no_forecast": int((scored & ~has).sum()),
        "market_questions": int(m.sum()),
        "ce_market": float(ce.mean()) if ce.size else float("nan"),
        "skill": float("nan"),
        "resolved_questions": int(r.sum()),
        "log_score": float(logs.mean()) if logs.size else float("nan"),
        "brier": float(brier.mean()) if brier.size else float("nan"),
        "ece": ece(q[r & has], outcome[r & has], bins) if (r & has).any() else float("nan"),
        "ece_market": ece(q[m & has], market[m & has], bins) if (m & has).any() else float("nan"),
        "sharpness": sharpness(q[scored & has]),
    }
    if ce.size:
        out["skill"] = reference_levels(market[m], "market", eps).skill(-out["ce_market"])
    return out


def predictions_table(questions: list[Question], samples: np.ndarray) -> pa.Table:
    """One row per question: what it was, what the model said (every sample, NaN = unparseable), and the summary."""
    mean, median, fail = point_forecasts(samples)
    return pa.table({
        "id": [q.id for q in questions],
        "source": [q.source for q in questions],
        "as_of": pa.array([q.as_of for q in questions], pa.date32()),
        "resolution_date": pa.array([q.resolution_date for q in questions], pa.date32()),
        "market_prob": pa.array([q.market_prob for q in questions], pa.float64()),
        "outcome": pa.array([q.outcome for q in questions], pa.int8()),
        "p_true": pa.array([q.p_true for q in questions], pa.float64()),
        "forecast_mean": pa.array(mean, pa.float64(), mask=np.isnan(mean)),
        "forecast_median": pa.array(median, pa.float64(), mask=np.isnan(median)),
        "format_fail_share": fail,
        "samples": pa.array(list(np.asarray(samples, dtype=np.float64)), pa.list_(pa.float64())),
    })


_COLUMNS = [("ce_market", "CE to market", "{:.4f}"), ("skill", "skill", "{:+.3f}"),
            ("log_score", "log score", "{:.4f}"), ("brier", "Brier", "{:.4f}"), ("ece", "ECE", "{:.4f}"),
            ("sharpness", "sharpness", "{:.3f}"), ("format_fail_rate", "format fail", "{:.3f}")]


def format_table(rows: dict[str, dict]) -> str:
    """Forecasters by metric; '-' where a metric does not apply (no market, nothing resolved)."""
    width = max(12, *map(len, rows))
    head = f"{'':{width}s}" + "".join(f"{title:>14s}" for _, title, _ in _COLUMNS) + f"{'n':>6s}"
    lines = [head]
    for name, m in rows.items():
        cells = [fmt.format(m[k]) if m.get(k) is not None and np.isfinite(m[k]) else "-" for k, _, fmt in _COLUMNS]
        lines.append(f"{name:{width}s}" + "".join(f"{c:>14s}" for c in cells) + f"{m['questions']:>6d}")
    lines.append("CE to market, Brier, ECE: lower is better; log score, skill: higher (skill 0 = best constant, "
                 "1 = the market); log score, Brier and ECE on resolved questions only")
    return "\n".join(lines)
