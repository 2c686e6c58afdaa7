"""`forecast-grpo eval`: a model's forecasts on a question file, scored beside the baselines it has to beat.

    forecast-grpo eval --model DIR --data EVAL.parquet [--samples N] [--train TRAIN.parquet | --base-rate P]
                       [--baseline-model DIR] [--compare NAME=FILE ...] [--tools on|off] [-o OUTDIR]
                       [--leaderboard LEADERBOARD.csv [--leaderboard-model NAME ...]]
                       [--config YAML] [--set KEY=VALUE ...]

The model samples N forecasts per question with the vLLM engine in this process (sampling, prompt and parsing
settings come from the job config: `--config` / `--set`, as for `train`), `run.eval_batch_questions` questions at a
time, with a progress bar (`run.progress`). Its forecast per question is the mean of its parsed samples. Baselines
on the same questions: always 0.5, the training base rate (`--train`: the training questions' mean market
probability, the constant a trained model has to beat; their outcome frequency where none has a market), the market
(scored against outcomes where they are known), and optionally another model (the untrained one), sampled the same
way.

A question whose prompt leaves no room for an answer in `rollout.max_model_len` is skipped, not fatal: a warning
names the first few, a model's row is scored on the questions it was asked (its `n`), and summary.json counts the
others (`skipped_too_long`, `skipped_too_long_first`).

`--compare NAME=FILE` adds a row for another system's published forecasts (`rollout/forecast_sets.py`: a ForecastBench
forecast set, or a JSONL / CSV of id and forecast), scored on the questions it forecast: its `n` is how many, and a
line under the table names its unmatched, invalid and duplicated rows. With `--compare`, `--model` may be left out:
then no engine starts, and the table holds the compared systems and the baselines.

Under the table, each model's row minus each baseline's, in CE to the market and in Brier, on the questions both
were scored on, with a 95% bootstrap interval over questions (`rollout.evaluate.mean_interval`) and its n: a few
hundred questions cannot separate small differences, and the interval says how small.

`--leaderboard FILE` (ForecastBench's `leaderboard_baseline.csv`) prints published figures where per-question
forecasts are not: the rows of the forecasters named with `--leaderboard-model` (and the superforecaster, public
and always-0.5 rows), their Brier index and Brier on their market questions, beside ours on the resolved market
questions of --data, each block saying whose numbers on whose questions (`rollout/leaderboard.py`). With it,
--model and --compare may both be left out: then ours are the baselines.

`--tools on` lets the model call the tools of `task.tools` as in training (every sample a conversation, every call
as of the question's date), with the tool service started in this process from the config's `tools:` section;
`--tools off` asks without them. Without the flag the config decides.

Writes to OUTDIR (default: RUN/eval for a checkpoint RUN/checkpoints/STEP, else runs/eval/MODEL_NAME, or
runs/eval/compare without --model):
    predictions.parquet            one row per question asked: every sample's forecast and text
                                   (`rollout.evaluate.predictions_table`)
    baseline_predictions.parquet   the same for --baseline-model
    summary.json                   every metric of every forecaster (a compared one's rows, matched or not, under
                                   `forecast_set`), each model minus each baseline (`vs`), the leaderboard's rows
                                   and ours (`leaderboard`), and how the run was made
and prints the table. `forecast-grpo report RUN` draws the reliability diagram from RUN/eval/predictions.parquet.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.config import ConfigError, JobConfig, load_config
from rollout import evaluate, forecast_sets, leaderboard
from rollout import questions as qio


def default_out_dir(model: str) -> Path:
    p = Path(model)
    if p.parent.name == "checkpoints":
        return p.parent.parent / "eval"
    return Path("runs") / "eval" / p.name


def check_model(path: str, flag: str) -> None:
    p = Path(path).expanduser()
    if p.exists():
        return
    if path.startswith((".", "/", "~")) or len(path.split("/")) != 2:
        raise ConfigError(f"{flag} {path!r} does not exist (a local model folder, or a hub id such as "
                          "Qwen/Qwen2.5-1.5B-Instruct)")


def sample_forecasts(cfg: JobConfig, name: str, model: str, questions: list, n: int, tool_url: str | None = None
                     ) -> evaluate.Samples:
    """n samples per question from a fresh engine on `model`, `run.eval_batch_questions` questions at a time (the
    progress of row `name`); the engine is released before returning (the next may need room). With `task.tools`
    every sample is a conversation whose calls go to the tool service at `tool_url`."""
    from rollout.worker import RolloutWorker

    worker = RolloutWorker(cfg.rollout_job(), model_path=model, tool_url=tool_url)
    size = cfg.run.eval_batch_questions
    progress = evaluate.Progress(name, len(questions), n, cfg.run.progress)
    parts = []
    for i in range(0, len(questions), size):
        parts.append(worker.forecasts(questions[i:i + size], n))
        progress.update(parts[-1])
    del worker
    gc.collect()
    out = evaluate.Samples.concat(parts)
    progress.close(out.split(questions)[2], cfg.rollout.max_model_len)
    return out


def read_compared(items: list[str], questions: list, taken: list[str]) -> dict[str, forecast_sets.ForecastSet]:
    """`--compare NAME=FILE` items -> row name -> forecast set. A set that forecasts none of the questions is an
    error: it is for another question set, and a row of dashes would hide that."""
    ids = [q.id for q in questions]
    out = {}
    for item in items:
        name, sep, path = (x.strip() for x in item.partition("="))
        if not sep or not name or not path:
            raise ConfigError(f"--compare {item!r}: expected NAME=FILE")
        if name in out or name in taken:
            raise ConfigError(f"--compare {item!r}: the table already has a row {name!r}")
        fs = forecast_sets.read_forecast_set(path)
        coverage = fs.coverage(ids)
        if not coverage["forecast"]:
            raise ConfigError(f"--compare {item!r}: forecasts none of the questions in the data\n  "
                              + forecast_sets.coverage_line(name, coverage))
        out[name] = fs
    return out


@dataclass
class Plan:
    cfg: JobConfig
    models: dict[str, str]
    """Row name -> model path; the first is the model under evaluation (none when only comparing)."""
    compared: dict[str, forecast_sets.ForecastSet]
    data: str
    questions: list
    samples: int | None
    out_dir: Path
    rate: float | None
    basis: str | None
    bins: int
    leaderboard: tuple[str, list[leaderboard.Row]] | None
    """The leaderboard file and the rows to print from it."""


def plan(args: argparse.Namespace) -> Plan:
    """Everything checked before an engine starts: a bad flag, config or file fails in seconds, not minutes."""
    if not args.model and not args.compare and not args.leaderboard:
        raise ConfigError("nothing to evaluate: give --model, --compare NAME=FILE or --leaderboard FILE")
    if args.leaderboard_model and not args.leaderboard:
        raise ConfigError("--leaderboard-model names a row of --leaderboard FILE: give the file too")
    if args.baseline_model and not args.model:
        raise ConfigError("--baseline-model is sampled beside --model: give --model too")
    cfg = load_config(args.config, args.set)
    models = {"model": args.model} if args.model else {}
    if args.baseline_model:
        models["baseline model"] = args.baseline_model
    for name, path in models.items():
        check_model(path, "--" + name.replace(" ", "-"))
    if args.model:
        cfg.model.path = args.model
    if args.tools == "off":
        cfg.task.tools = []
    elif args.tools == "on" and not cfg.task.tools:
        cfg.task.tools = ["wiki"]
    questions = qio.read_parquet(args.data)
    if not questions:
        raise ConfigError(f"{args.data}: no questions")
    rate, basis = args.base_rate, None if args.base_rate is None else "given with --base-rate"
    if args.train:
        rate, basis = evaluate.best_constant(qio.read_parquet(args.train))
        basis = f"{basis} in {args.train}"
    # the baselines' row names, taken whatever the rate: a compared system must not share one
    compared = read_compared(args.compare, questions, [*models, *evaluate.baselines(questions, 0.5)])
    board = (args.leaderboard, leaderboard.pick(leaderboard.read_leaderboard(args.leaderboard),
                                                args.leaderboard_model)) if args.leaderboard else None
    return Plan(cfg, models, compared, args.data, questions, (args.samples or cfg.run.eval_samples) if models else None,
                Path(args.out) if args.out else default_out_dir(args.model or "compare"), rate, basis, args.bins,
                board)


def _over_all(asked: np.ndarray, per: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-question scores of the questions asked (`asked`: a mask over all of them) as arrays over all, NaN for the
    questions not asked."""
    out = {}
    for k, v in per.items():
        out[k] = np.full(len(asked), np.nan)
        out[k][asked] = v
    return out


def run(p: Plan) -> dict:
    cfg, questions, eps = p.cfg, p.questions, p.cfg.task.clip_eps
    rows, per_sample = {}, {}
    scores = {}  # row name -> its per-question scores over all questions (NaN where it was not scored)
    service = None
    if cfg.task.tools and p.models:
        from tools.service import serve_in_thread

        service = serve_in_thread(cfg.tools)
        print(f"tools {', '.join(cfg.task.tools)}: the tool service answers at {service.url}", flush=True)
    try:
        sampled = {name: sample_forecasts(cfg, name, path, questions, p.samples, service and service.url)
                   for name, path in p.models.items()}
    finally:
        if service is not None:
            service.stop()
    for name, path in p.models.items():
        asked, samples, skipped = sampled[name].split(questions)  # scored on the questions it was asked
        qio.write_table(evaluate.predictions_table(asked, samples),
                        p.out_dir / ("predictions.parquet" if name == "model" else "baseline_predictions.parquet"))
        mean = evaluate.point_forecasts(samples.forecasts)[0]
        scores[name] = _over_all(sampled[name].asked, evaluate.question_scores(asked, mean, eps))
        ok, lost = evaluate.answered(samples.ends, samples.forecasts.shape)  # a cut conversation is no answer
        rows[name] = dict(evaluate.score_forecasts(asked, mean, eps, p.bins, skipped=skipped),
                          format_fail_rate=float(np.isnan(samples.forecasts[ok]).mean()) if ok.any() else float("nan"),
                          dropped_samples=lost, path=path)
        if not np.isnan(evaluate.truth(questions)).any():  # the training reward's view: every sample scored
            per_sample[name] = evaluate.summarize(asked, samples.forecasts, cfg.task.reward, eps,
                                                  cfg.task.format_penalty, skipped, samples.ends)
    for name, fs in p.compared.items():
        forecast = evaluate.align_forecasts(questions, fs.forecasts)
        scores[name] = evaluate.question_scores(questions, forecast, eps, missing="skip")
        rows[name] = dict(evaluate.score_forecasts(questions, forecast, eps, p.bins, missing="skip"),
                          forecast_set=fs.coverage([q.id for q in questions]))
    base = evaluate.baselines(questions, p.rate)
    for name, forecast in base.items():
        scores[name] = evaluate.question_scores(questions, forecast, eps, missing="skip")
        rows[name] = evaluate.score_forecasts(questions, forecast, eps, p.bins, missing="skip")
    vs = {name: {b: {k: evaluate.mean_interval(scores[name][k] - scores[b][k], seed=cfg.run.seed)
                     for k in ("ce", "brier")} for b in base} for name in p.models}
    market = ~np.isnan(base["market"])  # the market questions: where the leaderboard's market figures are from
    ours = {name: evaluate.mean_interval(s["brier"][market], seed=cfg.run.seed) for name, s in scores.items()}

    summary = {
        "data": str(p.data), "questions": len(questions), "samples": p.samples, "out_dir": str(p.out_dir),
        "base_rate": None if p.rate is None else {"value": p.rate, "basis": p.basis},
        "sampling": {"temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
                     "max_new_tokens": cfg.rollout.max_new_tokens, "reasoning": cfg.task.reasoning,
                     "tools": cfg.task.tools,
                     "clip_eps": eps, "seed": cfg.run.seed},
        "forecasters": rows,
        "per_sample": per_sample,
        "vs": vs,
        "leaderboard": None if p.leaderboard is None else {
            "file": p.leaderboard[0], "theirs": [vars(r) for r in p.leaderboard[1]], "ours_brier_market": ours},
    }
    p.out_dir.mkdir(parents=True, exist_ok=True)  # without a model no predictions were written there
    (p.out_dir / "summary.json").write_text(json.dumps(evaluate.jsonable(summary), indent=1))
    print(evaluate.format_table(rows))
    for name in p.compared:
        print(forecast_sets.coverage_line(name, rows[name]["forecast_set"]))
    for name, by_baseline in vs.items():
        for b, d in by_baseline.items():
            print(f"{name} minus {b}: CE {evaluate.interval_text(d['ce'])} (n {d['ce']['n']})   Brier "
                  f"{evaluate.interval_text(d['brier'])} (n {d['brier']['n']})")
    if vs:
        print("(below 0: the model is better; [95% bootstrap interval over questions])")
    if p.leaderboard:
        print(leaderboard.format_rows(p.leaderboard[1], ours, p.leaderboard[0], p.data))
    if p.rate is None:
        print("no base-rate baseline: give --train TRAIN.parquet or --base-rate P")
    print(f"wrote {p.out_dir}/summary.json" + (" and the predictions" if p.models else ""))
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="forecast-grpo eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (a training checkpoint or a Hugging Face folder); may be left out "
                    "with --compare")
    ap.add_argument("--data", required=True, help="questions to evaluate on (Parquet, rollout/questions.py schema)")
    ap.add_argument("--samples", type=int, default=None, help="forecasts sampled per question (default: "
                    "run.eval_samples)")
    rate = ap.add_mutually_exclusive_group()
    rate.add_argument("--train", help="training questions: the base-rate baseline is their mean market probability "
                      "(the best constant under CE to the market), or without markets their outcome frequency")
    rate.add_argument("--base-rate", type=float, help="the base-rate baseline's constant forecast")
    ap.add_argument("--baseline-model", help="also evaluate this model the same way (e.g. the untrained one)")
    ap.add_argument("--compare", action="append", default=[], metavar="NAME=FILE",
                    help="also score another system's published forecasts (a ForecastBench forecast set .json, or a "
                    ".jsonl / .csv of id and forecast), as the row NAME")
    ap.add_argument("--tools", choices=["off", "on"], default=None,
                    help="let the model call the tools of task.tools (on: [wiki] if the config names none; the "
                    "config's tools: section sets the service up), or not; default: as the config says")
    ap.add_argument("--leaderboard", metavar="FILE", help="ForecastBench's leaderboard_baseline.csv: print its rows "
                    "beside ours on the market questions")
    ap.add_argument("--leaderboard-model", action="append", default=[], metavar="NAME",
                    help="a row of --leaderboard to print, by its Model column (e.g. claude-3-5-sonnet-20241022); "
                    "the superforecaster, public and always-0.5 rows are always printed")
    ap.add_argument("--bins", type=int, default=10, help="equal-width bins for the ECE")
    ap.add_argument("-o", "--out", help="output folder")
    ap.add_argument("--config", help="job config YAML for sampling and prompt settings (cluster/configs/*.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = ap.parse_args(argv)
    if args.samples is not None and args.samples < 1:
        ap.error("--samples must be at least 1")
    if args.base_rate is not None and not 0.0 <= args.base_rate <= 1.0:
        ap.error("--base-rate must lie in [0, 1]")
    if args.bins < 1:
        ap.error("--bins must be at least 1")
    try:
        p = plan(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
