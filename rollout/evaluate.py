"""Scoring a policy's sampled forecasts on a fixed question set: against the three reference levels (`summarize`,
for questions with a known probability), and beside baseline forecasters and other systems' published forecasts
(`align_forecasts`) on real questions (`score_forecasts`: cross-entropy to the market, log and Brier scores on resolved
questions, ECE, sharpness).

The samples come back from the rollout workers as `Samples`, a batch of questions at a time (`Progress` shows how far
an evaluation is). A question whose prompt leaves no room for an answer in `rollout.max_model_len` is never asked:
it is skipped, counted (`skipped_too_long`) and named, and the scores are of the questions asked."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rollout.calibration import ece, sharpness
from rollout.questions import Question
from rollout.scoring import brier_score, default_penalty, expected_reward, log_score, reference_levels
from rollout.trajectory import DROPPED_ENDS


SHOWN_SKIPPED = 5
"""Skipped questions named in a warning and a summary (the count covers them all)."""


@dataclass
class Samples:
    """A policy's samples on a list of questions (`RolloutWorker.forecasts`), row i for question i."""

    forecasts: np.ndarray
    """[questions, n] parsed forecasts, NaN where unparseable (and in a skipped question's whole row)."""
    texts: list[list[str]]
    """Per question, what each sample wrote: the completion, or with tools the conversation's last turn (each at most
    rollout.max_new_tokens tokens); [] for a skipped question."""
    ends: list[list[str]]
    """Per question, why each sample ended: answer, length (cut at its token cap), or with tools budget, turns,
    deadline, eos, failed (`rollout/multiturn.py`); [] for a skipped question."""
    asked: np.ndarray
    """bool per question: False where its prompt does not fit rollout.max_model_len (skipped: never sampled)."""

    @staticmethod
    def concat(parts: list["Samples"]) -> "Samples":
        return Samples(np.concatenate([p.forecasts for p in parts]), [t for p in parts for t in p.texts],
                       [e for p in parts for e in p.ends], np.concatenate([p.asked for p in parts]))

    def split(self, questions: list[Question]) -> tuple[list[Question], "Samples", list[str]]:
        """The questions asked and their samples (what is scored), and the ids of the questions skipped."""
        keep = np.flatnonzero(self.asked)
        asked = Samples(self.forecasts[keep], [self.texts[i] for i in keep], [self.ends[i] for i in keep],
                        self.asked[keep])
        return [questions[i] for i in keep], asked, [q.id for q, ok in zip(questions, self.asked) if not ok]


def skipped_counts(skipped: list[str]) -> dict:
    """What a summary says of the questions skipped for a prompt longer than rollout.max_model_len allows."""
    return {"skipped_too_long": len(skipped), "skipped_too_long_first": list(skipped[:SHOWN_SKIPPED])}


class Progress:
    """An evaluation's progress as its batches come back: with `bar` (run.progress) a bar on stderr (questions done
    of all, samples/s, ETA), redrawn at every batch; then, either way, a line on stdout with the time it took and a
    warning naming the questions skipped."""

    def __init__(self, name: str, questions: int, n: int, bar: bool):
        from tqdm import tqdm

        self.name, self.total, self.n, self.samples, self.t0 = name, questions, n, 0, time.perf_counter()
        # drawn at every batch (they come seconds apart): tqdm's defaults would skip a quick one, the last included
        self.bar = tqdm(total=questions, desc=f"eval {name}", unit="question", disable=not bar, file=sys.stderr,
                        mininterval=0, miniters=1, dynamic_ncols=True, leave=False)

    def update(self, part: Samples) -> None:
        self.samples += int(part.asked.sum()) * self.n
        self.bar.set_postfix_str(f"{self.samples / (time.perf_counter() - self.t0):.1f} samples/s", refresh=False)
        self.bar.update(len(part.asked))

    def close(self, skipped: list[str], max_model_len: int) -> None:
        self.bar.close()
        s = time.perf_counter() - self.t0
        self.bar.write(f"eval {self.name}: {self.total - len(skipped)} questions x {self.n} samples in {s:.0f}s "
                       f"({self.samples / max(s, 1e-9):.1f} samples/s)")
        if skipped:
            self.bar.write(f"warning: eval {self.name}: {len(skipped)} of {self.total} questions skipped: their "
                           f"prompts leave no room for an answer in rollout.max_model_len={max_model_len} (first: "
                           f"{', '.join(skipped[:SHOWN_SKIPPED])})")


def jsonable(v):
    """A summary or a metrics row as JSON can hold it: numpy scalars as numbers, NaN and infinities as null (JSON
    has no NaN: `json.dumps` would write a bare NaN, which other readers refuse)."""
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    return None if isinstance(v, float) and not math.isfinite(v) else v


def fixed_subset(n: int, cap: int | None, seed: int) -> list[int]:
    """The indices of the questions an evaluation asks every time (`run.eval_max_questions`): all n, or a random `cap`
    of them drawn once from the seed, in order."""
    if not cap or n <= cap:
        return list(range(n))
    return sorted(np.random.default_rng([seed, 7]).choice(n, cap, replace=False).tolist())


def truth(questions: list[Question]) -> np.ndarray:
    """The best-known probability per question: p* for synthetic questions, else the market."""
    return np.array([q.p_true if q.p_true is not None else
                     (q.market_prob if q.market_prob is not None else np.nan) for q in questions], dtype=np.float64)


def answered(ends: list[list[str]] | None, shape: tuple[int, int]) -> tuple[np.ndarray, dict[str, int]]:
    """[questions, n] False for a sample whose conversation was cut by its deadline or failed on our side
    (`trajectory.DROPPED_ENDS`: no answer of the model's, so neither a score nor a format failure), and how many
    of each; every sample counts where the ends are not known."""
    if ends is None:
        return np.ones(shape, bool), dict.fromkeys(DROPPED_ENDS, 0)
    flat = [e for row in ends for e in row]
    return ~np.array([e in DROPPED_ENDS for e in flat], bool).reshape(shape), {r: flat.count(r) for r in DROPPED_ENDS}


def summarize(questions: list[Question], forecasts: np.ndarray, mode: str = "market", eps: float = 0.01,
              penalty: float | None = None, skipped: list[str] = (), ends: list[list[str]] | None = None) -> dict:
    """forecasts: [questions, samples], NaN = unparseable, for the questions asked; `skipped`: the ids of those not
    asked (too long), counted beside them; `ends` (`Samples.ends`): a sample cut by its deadline or failed on our
    side is left out and counted (`answered`). Rewards are expectations under the true probability."""
    if not questions:  # every prompt was too long: nothing to score, and no level to score it against
        return {**dict.fromkeys(("reward", "ce", "ce_minus_floor", "format_fail_rate", "skill"), float("nan")),
                "mean_forecast_by_truth": {}, "questions": 0, "samples": 0, **skipped_counts(skipped)}
    p = truth(questions)
    if np.isnan(p).any():
        raise ValueError("summarize needs a known probability (p_true or market_prob) for every question")
    pp = np.broadcast_to(p[:, None], forecasts.shape)
    ok, lost = answered(ends, forecasts.shape)
    rew = expected_reward(pp, forecasts, mode, eps, penalty)[ok]
    parsed = ~np.isnan(forecasts)
    ce = -log_score(pp[parsed], forecasts[parsed], eps)
    levels = reference_levels(p, mode, eps)
    reward = float(rew.mean()) if rew.size else float("nan")
    return {
        "reward": reward,
        "ce": float(ce.mean()) if ce.size else float("nan"),
        # the floor is the CE of clip(p): forecasts are clipped, so a market at 0.0005 cannot be matched exactly
        "ce_minus_floor": float((ce + log_score(pp[parsed], np.clip(pp[parsed], eps, 1 - eps), eps)).mean())
        if ce.size else float("nan"),
        "format_fail_rate": float(1 - parsed.sum() / ok.sum()) if ok.any() else float("nan"),
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
        "samples": int(ok.sum()),
        "dropped_samples": lost,
        **skipped_counts(skipped),
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


def best_constant(train: list[Question]) -> tuple[float, str]:
    """The constant to beat on held-out questions, and what it is: the training questions' mean market probability
    (the one answer that minimises the CE to the market over questions like them), else their `base_rate`."""
    market = _markets(train)
    market = market[~np.isnan(market)]
    if market.size:
        return float(market.mean()), f"mean market probability of {market.size} questions"
    return base_rate(train)


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


def _markets(questions: list[Question]) -> np.ndarray:
    return np.array([np.nan if x.market_prob is None else x.market_prob for x in questions], dtype=np.float64)


def _outcomes(questions: list[Question]) -> np.ndarray:
    return np.array([np.nan if x.outcome is None else x.outcome for x in questions], dtype=np.float64)


def question_scores(questions: list[Question], forecast: np.ndarray, eps: float = 0.01,
                    missing: str = "penalty") -> dict[str, np.ndarray]:
    """Per question: `ce` (cross-entropy to the market), `log` (log score of the outcome) and `brier` (Brier score of
    the outcome, a loss), NaN where the question has no market (ce) or no outcome (log, brier), or is not scored.

    missing: what a NaN forecast means. "penalty": the model gave no parseable answer, scored with the format
    penalty; "skip": the forecaster has nothing to say there (the market on questions without one), not scored.
    """
    if missing not in ("penalty", "skip"):
        raise ValueError(f"missing must be 'penalty' or 'skip', not {missing!r}")
    q = np.asarray(forecast, dtype=np.float64)
    if q.shape != (len(questions),):
        raise ValueError(f"{q.shape} forecasts for {len(questions)} questions")
    has = ~np.isnan(q)
    scored = has if missing == "skip" else np.ones_like(has)
    market, outcome = _markets(questions), _outcomes(questions)
    pen = default_penalty("market", eps)
    qq = np.where(has, q, 0.5)
    m = scored & ~np.isnan(market)
    r = scored & ~np.isnan(outcome)
    return {"ce": np.where(m, np.where(has, -log_score(market, qq, eps), -pen), np.nan),
            "log": np.where(r, np.where(has, log_score(outcome, qq, eps), pen), np.nan),
            "brier": np.where(r, np.where(has, -brier_score(outcome, qq, eps), 1.0), np.nan)}


def score_forecasts(questions: list[Question], forecast: np.ndarray, eps: float = 0.01, bins: int = 10,
                    missing: str = "penalty", skipped: list[str] = ()) -> dict:
    """Point forecasts (one per question) against the market and the outcomes (`question_scores`, averaged);
    `questions` in the result is how many were scored.

    skipped: the ids of questions the model was never asked (too long), not among `questions`: counted beside them.
    """
    per = question_scores(questions, forecast, eps, missing)
    q = np.asarray(forecast, dtype=np.float64)
    has = ~np.isnan(q)
    scored = has if missing == "skip" else np.ones_like(has)
    market, outcome = _markets(questions), _outcomes(questions)
    m, r = ~np.isnan(per["ce"]), ~np.isnan(per["brier"])
    ce = per["ce"][m]
    out = {
        "questions": int(scored.sum()),
        "no_forecast": int((scored & ~has).sum()),
        "market_questions": int(m.sum()),
        "ce_market": float(ce.mean()) if ce.size else float("nan"),
        "skill": float("nan"),
        "resolved_questions": int(r.sum()),
        "log_score": float(per["log"][r].mean()) if r.any() else float("nan"),
        "brier": float(per["brier"][r].mean()) if r.any() else float("nan"),
        "ece": ece(q[r & has], outcome[r & has], bins) if (r & has).any() else float("nan"),
        "ece_market": ece(q[m & has], market[m & has], bins) if (m & has).any() else float("nan"),
        "sharpness": sharpness(q[scored & has]),
        **skipped_counts(skipped),
    }
    if ce.size:
        out["skill"] = reference_levels(market[m], "market", eps).skill(-out["ce_market"])
    return out


def mean_interval(x: np.ndarray, boots: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """The mean of x over the questions where it is defined, and a percentile bootstrap interval over questions:
    {"mean", "low", "high", "n"}, NaN where none is. Given the difference of two forecasters' scores per question, the
    resample takes both forecasters' scores on the same questions, so what makes a question hard for both cancels."""
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    if not x.size:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // x.size)  # resamples at a time: at most 2M draws in memory
    means = np.concatenate([x[rng.integers(x.size, size=(min(chunk, boots - i), x.size))].mean(axis=1)
                            for i in range(0, boots, chunk)])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(x.mean()), "low": float(low), "high": float(high), "n": int(x.size)}


def interval_text(d: dict) -> str:
    """A `mean_interval` as `-0.0312 [-0.0480, -0.0150]` ("n/a" for a number that is not there: NaN, or null as JSON
    reads it back)."""
    def num(v):
        return format(v, "+.4f") if v is not None and math.isfinite(v) else "n/a"

    return f"{num(d['mean'])} [{num(d['low'])}, {num(d['high'])}]"


def heldout_summary(questions: list[Question], samples: Samples, constant: float, mode: str = "market",
                    eps: float = 0.01, skipped: list[str] = (), bins: int = 10, boots: int = 2000,
                    seed: int = 0) -> dict:
    """A policy's samples on held-out real questions, scored as a forecaster (its forecast per question: the mean of
    its parsed samples, the format penalty where none parsed) beside always 0.5, the best constant (`constant`: the
    training questions' mean market probability) and the market, whose cross-entropy to itself is the floor:

        ce, ce_constant, ce_half, ce_floor   mean CE to the market on the questions that have one
        skill = (ce_constant - ce) / (ce_constant - ce_floor)    0 = the best constant, 1 = the market
        brier, log_score, ece                on the resolved questions; ece_market, sharpness; format_fail_rate
        vs[baseline][ce | brier]             the model's score minus the baseline's (lower is better for both),
                                             with a 95% bootstrap interval over questions and its n
        reward                               the task reward of those forecasts: -ce, log_score or -brier

    A sample whose conversation was cut by its deadline or failed on our side (`trajectory.DROPPED_ENDS`) is no
    answer of the model's: it is left out, counted in `dropped_samples`, and a question left with none is not scored
    (`dropped_questions`)."""
    ok, lost = answered(samples.ends, samples.forecasts.shape)
    keep = ok.any(axis=1)
    qs = [q for q, k in zip(questions, keep) if k]
    forecasts, ok = samples.forecasts[keep], ok[keep]
    point = point_forecasts(forecasts)[0]
    market = _markets(qs)
    scores = {"model": question_scores(qs, point, eps)}
    for name, f in (("always 0.5", np.full(len(qs), 0.5)), ("best constant", np.full(len(qs), constant)),
                    ("market", market)):
        scores[name] = question_scores(qs, f, eps, missing="skip")
    mean = {name: {k: float(np.nanmean(v)) if (~np.isnan(v)).any() else float("nan") for k, v in s.items()}
            for name, s in scores.items()}
    ce, floor, const = mean["model"]["ce"], mean["market"]["ce"], mean["best constant"]["ce"]
    row = score_forecasts(qs, point, eps, bins, skipped=skipped)
    reward = {"market": -ce, "outcome_log": mean["model"]["log"], "outcome_brier": -mean["model"]["brier"]}[mode]
    return {
        "questions": len(qs), "market_questions": row["market_questions"],
        "resolved_questions": row["resolved_questions"], "samples": int(ok.sum()),
        "ce": ce, "ce_constant": const, "ce_half": mean["always 0.5"]["ce"], "ce_floor": floor,
        "ce_minus_floor": ce - floor,
        "skill": (const - ce) / (const - floor) if const - floor > 0 else float("nan"),
        "reward": reward, "brier": row["brier"], "log_score": row["log_score"], "ece": row["ece"],
        "ece_market": row["ece_market"], "sharpness": row["sharpness"],
        "format_fail_rate": float(np.isnan(forecasts[ok]).mean()) if ok.any() else float("nan"),
        "mean_forecast": float(np.nanmean(point)) if (~np.isnan(point)).any() else float("nan"),
        "constant": constant,
        "baselines": {name: {"ce": m["ce"], "brier": m["brier"], "log_score": m["log"]}
                      for name, m in mean.items() if name != "model"},
        "vs": {name: {k: mean_interval(scores["model"][k] - scores[name][k], boots, seed) for k in ("ce", "brier")}
               for name in scores if name != "model"},
        "dropped_samples": lost,
        "dropped_questions": int((~keep).sum()),
        **skipped_counts(skipped),
    }


def predictions_table(questions: list[Question], samples: Samples) -> pa.Table:
    """One row per question asked: what it was, what the model said (every sample's forecast, NaN = unparseable, its
    text and why it ended), and the summary."""
    mean, median, fail = point_forecasts(samples.forecasts)
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
        "samples": pa.array(list(np.asarray(samples.forecasts, dtype=np.float64)), pa.list_(pa.float64())),
        "texts": pa.array(samples.texts, pa.list_(pa.string())),
        "end_reasons": pa.array(samples.ends, pa.list_(pa.string())),
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
