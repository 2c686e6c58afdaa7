"""`forecast-grpo eval`: a model's forecasts on a question file, scored beside the baselines it has to beat.

    forecast-grpo eval --model DIR --data EVAL.parquet [--samples N] [--train TRAIN.parquet | --base-rate P]
                       [--baseline-model DIR] [--compare NAME=FILE ...] [--tools on|off] [-o OUTDIR]
                       [--config YAML] [--set KEY=VALUE ...]

The model samples N forecasts per question with the vLLM engine in this process (sampling, prompt and parsing
settings come from the job config: `--config` / `--set`, as for `train`). Its forecast per question is the mean
of its parsed samples. Baselines on the same questions: always 0.5, the training base rate, the market (scored
against outcomes where they are known), and optionally another model (the untrained one), sampled the same way.

`--compare NAME=FILE` adds a row for another system's published forecasts (`rollout/forecast_sets.py`: a ForecastBench
forecast set, or a JSONL / CSV of id and forecast), scored on the questions it forecast: its `n` is how many, and a
line under the table names its unmatched, invalid and duplicated rows. With `--compare`, `--model` may be left out:
then no engine starts, and the table holds the compared systems and the baselines.

`--tools on` lets the model call the tools of `task.tools` as in training (every sample a conversation, every call
as of the question's date), with the tool service started in this process from the config's `tools:` section;
`--tools off` asks without them. Without the flag the config decides.

Writes to OUTDIR (default: RUN/eval for a checkpoint RUN/checkpoints/STEP, else runs/eval/MODEL_NAME, or
runs/eval/compare without --model):
    predictions.parquet            one row per question (`rollout.evaluate.predictions_table`)
    baseline_predictions.parquet   the same for --baseline-model
    summary.json                   every metric of every forecaster (a compared one's rows, matched or not, under
                                   `forecast_set`), and how the run was made
and prints the table. `forecast-grpo report RUN` draws the reliability diagram from RUN/eval/predictions.parquet.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.config import ConfigError, JobConfig, load_config
from rollout import evaluate, forecast_sets
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


def sample_forecasts(cfg: JobConfig, model: str, questions: list, n: int, tool_url: str | None = None
                     ) -> np.ndarray:
    """[questions, n] forecasts from a fresh engine on `model`, released before returning (the next may need room).
    With `task.tools` every sample is a conversation whose calls go to the tool service at `tool_url`."""
    from rollout.worker import RolloutWorker

    t0 = time.perf_counter()
    worker = RolloutWorker(cfg.rollout_job(), model_path=model, tool_url=tool_url)
    out = worker.forecasts(questions, n)
    del worker
    gc.collect()
    print(f"{model}: {len(questions)} questions x {n} samples in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    return None if isinstance(v, float) and not math.isfinite(v) else v


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


def plan(args: argparse.Namespace) -> Plan:
    """Everything checked before an engine starts: a bad flag, config or file fails in seconds, not minutes."""
    if not args.model and not args.compare:
        raise ConfigError("nothing to evaluate: give --model, --compare NAME=FILE, or both")
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
        rate, basis = evaluate.base_rate(qio.read_parquet(args.train))
        basis = f"{basis} in {args.train}"
    # the baselines' row names, taken whatever the rate: a compared system must not share one
    compared = read_compared(args.compare, questions, [*models, *evaluate.baselines(questions, 0.5)])
    return Plan(cfg, models, compared, args.data, questions, (args.samples or cfg.run.eval_samples) if models else None,
                Path(args.out) if args.out else default_out_dir(args.model or "compare"), rate, basis, args.bins)


def run(p: Plan) -> dict:
    cfg, questions, eps = p.cfg, p.questions, p.cfg.task.clip_eps
    rows, per_sample = {}, {}
    service = None
    if cfg.task.tools and p.models:
        from tools.service import serve_in_thread

        service = serve_in_thread(cfg.tools)
        print(f"tools {', '.join(cfg.task.tools)}: the tool service answers at {service.url}", flush=True)
    try:
        sampled = {name: sample_forecasts(cfg, path, questions, p.samples, service and service.url)
                   for name, path in p.models.items()}
    finally:
        if service is not None:
            service.stop()
    for name, path in p.models.items():
        samples = sampled[name]
        table = evaluate.predictions_table(questions, samples)
        qio.write_table(table, p.out_dir / ("predictions.parquet" if name == "model" else
                                            "baseline_predictions.parquet"))
        mean = evaluate.point_forecasts(samples)[0]
        rows[name] = dict(evaluate.score_forecasts(questions, mean, eps, p.bins),
                          format_fail_rate=float(np.isnan(samples).mean()), path=path)
        if not np.isnan(evaluate.truth(questions)).any():  # the training reward's view: every sample scored
            per_sample[name] = evaluate.summarize(questions, samples, cfg.task.reward, eps, cfg.task.format_penalty)
    for name, fs in p.compared.items():
        forecast = evaluate.align_forecasts(questions, fs.forecasts)
        rows[name] = dict(evaluate.score_forecasts(questions, forecast, eps, p.bins, missing="skip"),
                          forecast_set=fs.coverage([q.id for q in questions]))
    for name, forecast in evaluate.baselines(questions, p.rate).items():
        rows[name] = evaluate.score_forecasts(questions, forecast, eps, p.bins, missing="skip")

    summary = {
        "data": str(p.data), "questions": len(questions), "samples": p.samples, "out_dir": str(p.out_dir),
        "base_rate": None if p.rate is None else {"value": p.rate, "basis": p.basis},
        "sampling": {"temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
                     "max_new_tokens": cfg.rollout.max_new_tokens, "reasoning": cfg.task.reasoning,
                     "tools": cfg.task.tools,
                     "clip_eps": eps, "seed": cfg.run.seed},
        "forecasters": rows,
        "per_sample": per_sample,
    }
    p.out_dir.mkdir(parents=True, exist_ok=True)  # without a model no predictions were written there
    (p.out_dir / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1))
    print(evaluate.format_table(rows))
    for name in p.compared:
        print(forecast_sets.coverage_line(name, rows[name]["forecast_set"]))
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
    rate.add_argument("--train", help="training questions: the base-rate baseline is their outcome frequency")
    rate.add_argument("--base-rate", type=float, help="the base-rate baseline's constant forecast")
    ap.add_argument("--baseline-model", help="also evaluate this model the same way (e.g. the untrained one)")
    ap.add_argument("--compare", action="append", default=[], metavar="NAME=FILE",
                    help="also score another system's published forecasts (a ForecastBench forecast set .json, or a "
                    ".jsonl / .csv of id and forecast), as the row NAME")
    ap.add_argument("--tools", choices=["off", "on"], default=None,
                    help="let the model call the tools of task.tools (on: [wiki] if the config names none; the "
                    "config's tools: section sets the service up), or not; default: as the config says")
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
