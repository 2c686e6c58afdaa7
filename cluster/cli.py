"""`forecast-grpo`: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _tiny_model(argv: list[str]) -> int:
    from model import tiny as tiny_model

    ap = argparse.ArgumentParser(prog="forecast-grpo tiny-model",
                                 description="Build the tiny forecaster (tokenizer, Qwen2 model, format warm start).")
    ap.add_argument("out", help="output folder (Hugging Face format)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if OUT was built from the same spec")
    args = ap.parse_args(argv)
    spec = tiny_model.TinyModelSpec(seed=args.seed)
    (tiny_model.build if args.force else tiny_model.ensure)(args.out, spec)
    return 0


def _tool_world(argv: list[str]) -> int:
    from rollout import tool_world

    ap = argparse.ArgumentParser(prog="forecast-grpo tool-world",
                                 description="Write the synthetic tool world's wiki snapshot and news corpus (the "
                                 "files the demo's tool service loads; rollout/tool_world.py).")
    ap.add_argument("out", help="output folder: wiki.parquet and news.parquet")
    args = ap.parse_args(argv)
    wiki, news = tool_world.write_snapshot(Path(args.out) / "wiki.parquet"), tool_world.write_news(
        Path(args.out) / "news.parquet")
    print(f"wrote {wiki} and {news}")
    return 0


def _data_parser() -> argparse.ArgumentParser:
    from rollout import importers

    ap = argparse.ArgumentParser(prog="forecast-grpo data", description="Import, check and split question files "
                                 "(Parquet, one schema: rollout/questions.py).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="convert an outside file; what cannot be used is skipped and counted",
                         description="Convert to our Parquet schema. Rows that cannot be used are skipped and "
                         "counted by reason. Formats: rollout/importers.py.")
    fmt = imp.add_subparsers(dest="format", required=True)
    fb = fmt.add_parser("forecastbench", help="ForecastBench question sets (+ their resolution sets)",
                        description="Question sets and their resolution sets, as files or folders holding them (a "
                        "resolution set goes with the question set it names). A question asked in several sets is "
                        "kept once, from the earliest set; the later askings are counted (rollout/importers.py).")
    fb.add_argument("paths", nargs="+", metavar="SET_OR_FOLDER",
                    help="QUESTION_SET.json, RESOLUTION_SET.json (outcomes, and dataset questions), or a folder of "
                    "them, e.g. ../shared/data/forecastbench")
    fb.add_argument("-o", "--out", required=True, help="OUT.parquet")
    for name in ("jsonl", "csv"):
        t = fmt.add_parser(name, help=f"one question per {'line' if name == 'jsonl' else 'row'}",
                           description="Columns are named as the schema's fields unless mapped with --map "
                           f"FIELD=COLUMN. Fields: {', '.join(importers.FIELDS)}; id and text are required. Dates: "
                           "ISO dates or datetimes; outcome: 0/1, true/false or yes/no; an empty cell is missing. "
                           "Other columns are ignored (and listed).")
        t.add_argument("file")
        t.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                       help="read FIELD from COLUMN, e.g. --map text=question --map market_prob=p")
        t.add_argument("--source", help="source of rows without a source column (default: the file's name)")
        t.add_argument("-o", "--out", required=True, help="OUT.parquet")
    val = sub.add_parser("validate", help="report every bad row (number and field); exit 1 if any")
    val.add_argument("file", help="a question Parquet file")
    sp = sub.add_parser("split", help="time split: as-of before the cutoff trains, the rest evaluates",
                        description="Train on questions asked before --cutoff, evaluate on the later ones; a "
                        "question never lands on both sides (rollout/splits.py).")
    sp.add_argument("file", help="a question Parquet file")
    sp.add_argument("--cutoff", required=True, help="ISO date: as-of before it -> train, on or after -> eval")
    sp.add_argument("--train", required=True, help="TRAIN.parquet to write")
    sp.add_argument("--eval", required=True, help="EVAL.parquet to write")
    sp.add_argument("--keep-late-outcomes", action="store_true",
                    help="keep the outcomes of training questions resolved on or after the cutoff")
    return ap


def _data(argv: list[str]) -> int:
    import datetime as dt

    from rollout import importers, splits
    from rollout import questions as qio

    args = _data_parser().parse_args(argv)
    try:
        if args.cmd == "import":
            if args.format == "forecastbench":
                qs, report = importers.import_forecastbench(*args.paths)
            else:
                read = importers.import_jsonl if args.format == "jsonl" else importers.import_csv
                qs, report = read(args.file, importers.parse_mapping(args.map), args.source)
            print("\n".join(report.lines()))
            if not qs:
                print("error: nothing to write", file=sys.stderr)
                return 1
            qio.write_parquet(qs, args.out)
            print(f"wrote {args.out}")
        elif args.cmd == "validate":
            good, errors = qio.check_parquet(args.file)
            for e in errors:
                print(e)
            if errors:
                print(f"{args.file}: {len(errors)} problems in {len({e.row for e in errors})} rows")
                return 1
            print(f"OK {args.file}: {len(good)} questions, {sum(q.market_prob is not None for q in good)} with a "
                  f"market probability, {sum(q.outcome is not None for q in good)} resolved")
        else:
            try:
                cutoff = dt.date.fromisoformat(args.cutoff)
            except ValueError:
                print(f"error: --cutoff {args.cutoff!r} is not an ISO date (YYYY-MM-DD)", file=sys.stderr)
                return 2
            split = splits.time_split(qio.read_parquet(args.file), cutoff, not args.keep_late_outcomes)
            print("\n".join(split.lines()))
            qio.write_parquet(split.train, args.train)
            qio.write_parquet(split.eval, args.eval)
            print(f"wrote {args.train} and {args.eval}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


COMMANDS = {
    "train": ("cluster.train", "main", "train with GRPO on Ray"),
    "plan": ("cluster.plan", "main", "placement and per-GPU memory of a config; refuses one that cannot fit"),
    "eval": ("cluster.evaluate_cli", "main", "score a model's forecasts on a question file, beside baselines"),
    "report": ("cluster.report", "main", "plot a run: learning curve, reliability diagram"),
    "data": (None, _data, "import, validate and split question files"),
    "tiny-model": (None, _tiny_model, "build the tiny local model"),
    "tool-world": (None, _tool_world, "write the synthetic tool world's wiki snapshot and news corpus"),
    "model": ("model.cli", "main", "import a real model (GGUF) and check a model before training"),
    "warmstart": ("model.cli", "warmstart_main", "teach a model the answer (and call) format before GRPO"),
    "wiki": ("tools.cli", "wiki_main", "Wikipedia as of a date: get a page, serve the tools, cache snapshots"),
    "news": ("tools.cli", "news_main", "import a news corpus for the news tool"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: forecast-grpo COMMAND [...]\n\ncommands:")
        for name, (_, _, doc) in COMMANDS.items():
            print(f"  {name:12s} {doc}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, fn, _ = COMMANDS[argv[0]]
    if module:
        import importlib

        fn = getattr(importlib.import_module(module), fn)
    return fn(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
