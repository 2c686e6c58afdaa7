"""Bounded-staleness asynchronous GRPO against synchronous: wall time to a held-out target, and the final CE.

    python bench/staleness.py [--minutes 7] [--staleness 0,2,4] [--targets=-0.5,0]
    python bench/staleness.py --model models/smollm2-135m --minutes 30      # the real model's dice recipe

Each setting trains the same recipe (default `cluster/configs/dice-cpu.yaml` on `dice_sizes`, the tiny model; with
`--model` the real model's `smollm2-dice-cpu.yaml`) for the same budget, evaluating the held-out die sizes every
`--eval-every` steps:

- staleness 0, synchronous: generate a batch, train on it, load the new weights into the engine, in turn
  (`sync.overlap=false`, `sync.every=1`);
- staleness k >= 1: the next batch is generated while the learner trains (`sync.overlap=true`) and the engine loads
  weights every k steps (`sync.every=k`, `sync.max_staleness=k`): a batch was sampled by weights up to k steps old.

Before measuring, the ceiling from the synchronous run's own split: overlapping generation with training can at best
turn a step of gen + train + sync into max(gen, train), and only if the two do not share the cores; on this
machine's two cores both are compute-bound, so the gain is what one role leaves idle.

Time to target counts training time only (the sum of the steps' wall times up to the first evaluation at or past
a target skill, `--targets`, on the held-out set), so a setting is not charged for its evaluations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: learning.py beside it

from learning import ROOT, run, saved, warm_start  # noqa: E402


def setting(staleness: int) -> list[str]:
    if staleness == 0:
        return ["sync.overlap=false", "sync.every=1", "sync.max_staleness=0"]
    return ["sync.overlap=true", f"sync.every={staleness}", f"sync.max_staleness={staleness}"]


def time_to_target(summary: dict, split: str, target: float) -> tuple[float | None, int | None]:
    """Training seconds (and steps) until the first evaluation of `split` with skill >= target."""
    steps = [m for m in summary["metrics"] if "step_s" in m]
    for m in summary["metrics"]:
        for e in m.get("evals", []):
            if e["set"] == split and e["skill"] is not None and e["skill"] >= target:
                return sum(s["step_s"] for s in steps if s["step"] < e["steps"]), e["steps"]
    return None, None


def split_line(summary: dict) -> tuple[str, dict]:
    steps = [m for m in summary["metrics"] if "step_s" in m][1:]  # the first step carries the engines' warm-up
    mean = {k: statistics.fmean(m.get(k, 0.0) for m in steps) for k in ("step_s", "gen_s", "train_s", "sync_s",
                                                                          "weight_load_s")}
    return (f"{mean['step_s']:.3f} s/step (generate {mean['gen_s']:.3f}, train {mean['train_s']:.3f}, sync "
            f"{mean['sync_s']:.3f}, engine weight load {mean['weight_load_s']:.3f})"), mean


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a real model's folder: its dice recipe, warm-started first")
    ap.add_argument("--config", default=None, help="default: dice-cpu.yaml (with --model smollm2-dice-cpu.yaml)")
    ap.add_argument("--families", default="dice_sizes")
    ap.add_argument("--minutes", type=float, default=7.0, help="training budget of each setting")
    ap.add_argument("--staleness", default="0,2,4", help="comma-separated settings; 0 = synchronous")
    ap.add_argument("--targets", default="-0.5,0", help="held-out skills the time is measured to (comma-separated)")
    ap.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations (default "
                    "100, with --model 8); a multiple of every staleness so evaluations see synced weights")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--report", action="store_true", help="report the runs already in --out-dir, training nothing")
    args = ap.parse_args()

    config = args.config or str(ROOT / "cluster/configs" / ("smollm2-dice-cpu.yaml" if args.model else
                                                            "dice-cpu.yaml"))
    settings = [int(s) for s in args.staleness.split(",")]
    targets = [float(t) for t in args.targets.split(",")]
    every = args.eval_every or (8 if args.model else 100)
    if bad := [s for s in settings if s and every % s]:
        sys.exit(f"--eval-every {every} is not a multiple of staleness {bad}: evaluations would see stale weights")
    sets = [f"task.families=[{args.families}]", f"run.eval_every={every}", *args.set,
            *([f"warmstart.base={args.model}"] if args.model else [])]
    if args.model and not args.report:
        warm_start(config, sets)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="staleness-")

    rows, base = [], None
    for k in settings:
        s = saved(out_dir, f"staleness{k}") if args.report else run(config, args.minutes, sets + setting(k), out_dir,
                                                                       f"staleness{k}")
        line, mean = split_line(s)
        print(f"\nstaleness {k}: {s['steps']} steps, {line}", flush=True)
        if k == 0:
            base = mean
            busy = max(mean["gen_s"], mean["train_s"])
            print(f"ceiling from this split: {mean['step_s']:.3f} s/step -> max(generate, train) {busy:.3f}: "
                  f"{mean['step_s'] / busy:.2f}x at most, if generation and training had cores of their own")
        reached = []
        for target in targets:
            t, at = time_to_target(s, "heldout", target)
            reached.append(f"{t:.0f} s ({at} steps)" if t is not None else "not reached")
        b, a = s["eval_before"]["heldout"], s["eval_after"]["heldout"]
        speed = f"{base['step_s'] / mean['step_s']:.2f}x" if base else "n/a"
        rows.append(f"| {k or 'synchronous'} | {mean['step_s']:.3f} | {speed} | {' | '.join(reached)} | "
                    f"{b['skill']:+.2f} → {a['skill']:+.2f} | {b['ce_minus_floor']:.3f} → {a['ce_minus_floor']:.3f} "
                    f"| {s['eval_after']['train']['skill']:+.2f} | {s['steps']} |")
    print("\n| max staleness | s/step | steps/s vs synchronous | "
          + " | ".join(f"training time to held-out skill {t:+.2f}" for t in targets)
          + " | held-out skill before → after | held-out CE−floor | train skill after | steps |\n|"
          + " --- |" * (7 + len(targets)))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
