"""`forecast-grpo`: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
import sys


def _tiny_model(argv: list[str]) -> int:
    from learner import tiny_model

    ap = argparse.ArgumentParser(prog="forecast-grpo tiny-model",
                                 description="Build the tiny forecaster (tokenizer, Qwen2 model, format warm start).")
    ap.add_argument("out", help="output folder (Hugging Face format)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if OUT was built from the same spec")
    args = ap.parse_args(argv)
    spec = tiny_model.TinyModelSpec(seed=args.seed)
    (tiny_model.build if args.force else tiny_model.ensure)(args.out, spec)
    return 0


COMMANDS = {
    "train": ("cluster.train", "main", "train with GRPO on Ray"),
    "tiny-model": (None, _tiny_model, "build the tiny local model"),
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
