"""`forecast-grpo report RUN_DIR`: the plots of a training run, as PNG files in the run folder.

    learning_curve.png   reward per step against the three reference levels (random, best constant, entropy
                         floor), and the cross-entropy to the target against its floor (-ref_floor), with each
                         evaluation set's CE over the steps (`evals` in metrics.jsonl; on held-out real questions
                         beside its best constant and the market's floor)
    reliability.png      mean forecast against observed frequency per bin, with the forecast histogram below;
                         drawn when the run has eval predictions (RUN_DIR/eval/predictions.parquet, written by
                         `forecast-grpo eval` on one of the run's checkpoints) or when --predictions names a file

Both plotting functions take their data explicitly, so the driver can draw them from what it has in memory. With
nothing to draw (no step with a reward, no parseable forecast) each says so and draws nothing: the end of a run never
fails on a plot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

from rollout.calibration import reliability  # noqa: E402

_LEVELS = [("ref_floor", "entropy floor (p*)", "tab:green"), ("ref_constant", "best constant", "tab:orange"),
           ("ref_random", "random answer", "tab:red")]


def read_metrics(path: str | Path) -> list[dict]:
    """metrics.jsonl: one JSON object per step; a line cut off by a crash at the end is skipped."""
    rows = []
    lines = Path(path).read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise ValueError(f"{path}:{n}: not JSON") from None
    return rows


def _series(metrics: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the steps that have a value (a skipped step has no reward; NaN is read back as null)."""
    pts = [(m["step"], m[key]) for m in metrics if m.get(key) is not None and np.isfinite(m[key]) and "step" in m]
    return (np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)) if pts else \
        (np.array([]), np.array([]))


def plot_learning_curve(metrics: list[dict], levels: dict | None, path: str | Path, reward_mode: str = "market",
                        title: str = "") -> Path | None:
    """Reward (and its noise-free expectation) per step against the reference levels; CE against its floor.

    The CE floor is -ref_floor where the reward is a log score (market, outcome_log): there the floor reward is
    minus the entropy of the targets. For outcome_brier there is no CE floor to draw. None (and a line saying so)
    where no step has a reward.
    """
    if not _series(metrics, "reward_mean")[0].size:
        return _skipped(path, "no step has a reward")
    fig, (ax_r, ax_c) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    window = max(1, len(metrics) // 50)
    shown = []
    for key, label, color in (("reward_mean", "reward (sampled)", "tab:blue"),
                              ("expected_reward", "expected reward", "tab:cyan")):
        x, y = _series(metrics, key)
        if x.size:
            ax_r.plot(x, y, color=color, alpha=0.25, linewidth=0.7)
            ax_r.plot(x, _rolling(y, window), color=color, label=f"{label}, mean of {window} steps")
            shown.append(_rolling(y, window))
    if levels:
        for key, label, color in _LEVELS:
            if levels.get(key) is not None:
                ax_r.axhline(levels[key], color=color, linestyle=":", label=f"{label} {levels[key]:.3f}")
        if shown and levels.get("ref_random") is not None and levels.get("ref_floor") is not None:
            # one format failure (-9.2) in a step would otherwise flatten the whole curve
            low = min(levels["ref_random"], float(np.nanmin(np.concatenate(shown))))
            pad = 0.1 * (levels["ref_floor"] - low)
            ax_r.set_ylim(low - pad, levels["ref_floor"] + pad)
    ax_r.set_ylabel("reward")
    ax_r.legend(fontsize=8, loc="lower right")
    ax_r.grid(alpha=0.3)
    x, y = _series(metrics, "ce_mean")
    if x.size:
        ax_c.plot(x, y, color="tab:purple", alpha=0.25, linewidth=0.7)
        ax_c.plot(x, _rolling(y, window), color="tab:purple", label=f"CE to target (parsed answers), mean of "
                  f"{window} steps")
    if levels and levels.get("ref_floor") is not None and reward_mode in ("market", "outcome_log"):
        ax_c.axhline(-levels["ref_floor"], color="tab:green", linestyle=":",
                     label=f"floor: entropy of the targets {-levels['ref_floor']:.3f}")
    _plot_evals(ax_c, [e for m in metrics for e in m.get("evals", [])])
    ax_c.set_xlabel("step")
    ax_c.set_ylabel("cross-entropy (nats)")
    ax_c.legend(fontsize=8, loc="upper right")
    ax_c.grid(alpha=0.3)
    fig.suptitle(title or "learning curve")
    return _save(fig, path)


def _plot_evals(ax, records: list[dict]) -> None:
    """Each evaluation set's CE by the steps done when it was taken; a held-out set of real questions also gets
    its best constant's CE and the market's floor (the last evaluation's: the same questions every time)."""
    sets: dict[str, list[dict]] = {}
    for r in records:
        if r.get("ce") is not None:
            sets.setdefault(r["set"], []).append(r)
    for k, (name, rs) in enumerate(sets.items()):
        color = f"C{5 + k % 5}"  # brown, pink, gray, olive, cyan: none of the training curves' colors
        ax.plot([r["steps"] for r in rs], [r["ce"] for r in rs], "o-", color=color, label=f"eval {name}: CE")
        last = rs[-1]
        for key, label, style in (("ce_constant", "best constant", "--"), ("ce_floor", "market floor", ":")):
            if last.get(key) is not None:
                ax.axhline(last[key], color=color, linestyle=style, linewidth=0.8,
                           label=f"eval {name}: {label} {last[key]:.3f}")


def _rolling(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` steps (fewer at the start), NaNs ignored."""
    if window <= 1:
        return y
    ok = ~np.isnan(y)
    c = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    n = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(0, i - window)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (c[i] - c[lo]) / (n[i] - n[lo])


def _floats(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def reliability_data(predictions: pa.Table) -> tuple[np.ndarray, np.ndarray, str]:
    """(forecast, target, target name) from a predictions table: outcomes where any question is resolved, else the
    known probability (p_true, else the market): calibration to the truth rather than to what happened."""
    cols = predictions.to_pydict()
    q, o = _floats(cols["forecast_mean"]), _floats(cols["outcome"])
    if (~np.isnan(o)).any():
        return q, o, "observed frequency (resolved questions)"
    p = _floats(t if t is not None else m for t, m in zip(cols["p_true"], cols["market_prob"]))
    return q, p, "mean true probability (p*, else the market)"


def plot_reliability(series: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, bins: int = 10,
                     ylabel: str = "observed frequency", title: str = "") -> Path | None:
    """One line per forecaster: {label: (forecasts, targets)}; NaN pairs are left out. Histogram of forecasts below.
    None (and a line saying so) where no forecaster has a parseable forecast with a target."""
    fig, (ax, ax_h) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfectly calibrated")
    drawn, width = 0, 0.9 / bins / len(series)
    for k, (label, (q, y)) in enumerate(series.items()):
        rel = reliability(q, y, bins)
        full = rel.count > 0
        if not full.any():
            continue
        drawn += 1
        ax.plot(rel.mean_forecast[full], rel.observed[full], "o-", label=f"{label} (ECE {rel.ece:.3f}, "
                f"n {int(rel.count.sum())})")
        left = rel.edges[:-1] + 0.05 / bins + k * width
        ax_h.bar(left, rel.count, width=width, align="edge", alpha=0.7, label=label)
    if not drawn:
        plt.close(fig)
        return _skipped(path, "no parseable forecast with a target to compare it with")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    ax_h.set_xlabel("forecast")
    ax_h.set_ylabel("questions")
    fig.suptitle(title or "reliability")
    return _save(fig, path)


def _skipped(path: str | Path, why: str) -> None:
    print(f"{Path(path).name}: {why}; the plot is skipped", file=sys.stderr, flush=True)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def report(run_dir: str | Path, predictions: str | Path | None = None) -> list[Path]:
    run = Path(run_dir)
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run}: no metrics.jsonl (is it a training run folder?)")
    summary_path = run / "summary.json"
    levels = json.loads(summary_path.read_text()).get("reference_levels") if summary_path.is_file() else None
    config_path = run / "config.yaml"
    mode = "market"
    if config_path.is_file():
        mode = ((yaml.safe_load(config_path.read_text()) or {}).get("task") or {}).get("reward", mode)
    pred_path = Path(predictions) if predictions else run / "eval" / "predictions.parquet"
    if predictions and not pred_path.is_file():
        raise FileNotFoundError(f"predictions not found: {pred_path}")
    out = [plot_learning_curve(read_metrics(metrics_path), levels, run / "learning_curve.png", mode, run.name)]
    if pred_path.is_file():
        q, y, ylabel = reliability_data(pq.read_table(pred_path))
        out.append(plot_reliability({"model": (q, y)}, run / "reliability.png", ylabel=ylabel,
                                    title=f"{run.name}: {pred_path}"))
    else:
        print(f"no eval predictions in {run / 'eval'}: run `forecast-grpo eval --model {run}/checkpoints/STEP "
              "--data FILE` for the reliability diagram")
    return [p for p in out if p is not None]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="forecast-grpo report", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a training run folder (runs/NAME)")
    ap.add_argument("--predictions", help="eval predictions to draw the reliability diagram from "
                    "(default: RUN_DIR/eval/predictions.parquet, if there)")
    args = ap.parse_args(argv)
    try:
        paths = report(args.run_dir, args.predictions)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
