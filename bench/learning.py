"""Does GRPO learn? From the warm-started tiny model, train on synthetic questions for a wall-clock budget and report
CE minus the entropy floor and skill before and after, on the training questions and on held-out parameters.

    python bench/learning.py [--families dice_sizes] [--config cluster/configs/dice-cpu.yaml] [--minutes 15]
                             [--set k=v ...] [--label NAME]
    python bench/learning.py --tools [--minutes 20]        # the tool benefit: the tool world, with and without tools
    python bench/learning.py --model models/smollm2-135m [--tools] [--minutes 60]   # a real pretrained model
    python bench/learning.py --config cluster/configs/smollm2-forecastbench-cpu.yaml   # real questions, held out
    python bench/learning.py --model models/smollm2-135m --minutes 30 \
        --compare learner.lora.r=16 --compare learner.lr=2e-4   # full fine-tuning, then LoRA, the same budget

The default family, dice_sizes, trains on 4-, 6-, 8-, 10-, 12- and 20-sided dice and holds out 5, 7, 9 and 11
sides: the held-out figure says whether the model learned what the number of sides does. `--families dice` is the
TRL peer's six-sided die. `--tools` trains the demo's recipe (`cluster/configs/demo-cpu.yaml`: the tool world with
the wiki tool) and evaluates the model with its tools and without them, on training and held-out players; then
trains the same model for the same budget without tools (`task.tools=[]`), which can learn only the base rate.

`--model DIR` takes a real pretrained model (`make real-model`) through its recipe (`cluster/configs/smollm2-dice-cpu
.yaml`, with `--tools` `smollm2-tools-cpu.yaml`): the format warm start from DIR first (`forecast-grpo warmstart`, its
time and format rates printed; nothing to do on a second run), then GRPO, 60 minutes by default. Any config with a
`warmstart:` section is warm-started the same way first.

A config on real questions (`task.source: parquet`, e.g. `smollm2-forecastbench-cpu.yaml`: the questions of
`forecast-grpo data import` and `data split`, README "Forecasting data and evaluation") trains for its
`run.max_minutes` (60) and reports its held-out set: CE to the market before and after, beside always 0.5, the best
constant (the training questions' mean market probability) and the market's floor, and the model's differences from
each with their 95% bootstrap intervals. `--set model.path=models/tiny --set warmstart.base=null` runs the tiny
model on the same split, for contrast. `bench/question_signal.py` says what to read the result against: how far
anything fitted to the same training markets gets on the same held-out questions.

`--compare KEY=VALUE` (repeatable) trains a second run after the first: the same model, warm start and budget with
these settings on top (e.g. LoRA against full fine-tuning), each reported as its own row, so the two rows come from one
command on the same machine.

The run is the real job (`python -m cluster.train`: Ray, vLLM, DeepSpeed). It ends with a Markdown table row per run
(setting, skill train / held-out, CE-floor, steps, wall time) as kept in bench/README.md, and the step's split
(generate / train / sync seconds, from metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages

from cluster.config import load_config  # noqa: E402
from cluster.train import heldout_lines  # noqa: E402
from rollout.evaluate import interval_text  # noqa: E402


def run(config: str, minutes: float, sets: list[str], out_dir: str, name: str) -> dict:
    cmd = [sys.executable, "-m", "cluster.train", "--config", config, "--set", f"run.max_minutes={minutes}",
           "--set", "run.steps=1000000", "--set", f"run.out_dir={out_dir}", "--set", f"run.name={name}",
           "--set", "run.progress=false", "--set", "run.trajectories_every=0"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    if res.returncode != 0:
        sys.exit(f"training failed:\n{res.stderr[-4000:]}")
    summary = saved(out_dir, name)
    summary["process_wall_s"] = time.perf_counter() - t0
    return summary


def saved(out_dir: str, name: str) -> dict:
    """A finished run's summary.json, with its metrics.jsonl rows under "metrics"."""
    summary = json.loads((Path(out_dir) / name / "summary.json").read_text())
    summary["metrics"] = [json.loads(ln) for ln in (Path(out_dir) / name / "metrics.jsonl").read_text().splitlines()
                          if ln.strip()]
    return summary


def warm_start(config: str, sets: list[str]) -> None:
    """The recipe's format warm start (nothing to do if its model.path was warm-started the same way already)."""
    cmd = [sys.executable, "-m", "cluster.cli", "warmstart", "--config", config]
    for s in sets:
        cmd += ["--set", s]
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        sys.exit("the warm start failed")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tools", action="store_true", help="the tool benefit: the demo's tool-world recipe, 20 minutes")
    ap.add_argument("--families", default=None, help="comma-separated synthetic families to train on "
                    "(default: dice_sizes; with --tools: tool_world)")
    ap.add_argument("--model", default=None, help="a real model's folder (`make real-model`): its recipe, warm-started")
    ap.add_argument("--config", default=None, help="default: cluster/configs/dice-cpu.yaml, with --tools "
                    "demo-cpu.yaml; with --model smollm2-dice-cpu.yaml, with --tools smollm2-tools-cpu.yaml")
    ap.add_argument("--minutes", type=float, default=None, help="training budget (default 15, with --tools 20, with "
                    "--model or a config on real questions 60)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--label", default=None, help="the setting's name in the table row (default: the --set list)")
    ap.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                    help="then a second run with these settings on top of the first's, the same budget")
    ap.add_argument("--out-dir", default=None, help="keep the run here (default: a temporary folder)")
    args = ap.parse_args()

    recipe = ("smollm2-tools-cpu.yaml" if args.tools else "smollm2-dice-cpu.yaml") if args.model else \
        ("demo-cpu.yaml" if args.tools else "dice-cpu.yaml")
    config = args.config or str(ROOT / "cluster/configs" / recipe)
    real = load_config(config, args.set).task.source == "parquet"
    families = args.families or ("tool_world" if args.tools else "dice_sizes")
    minutes = args.minutes or (60.0 if args.model or real else 20.0 if args.tools else 15.0)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="learning-")
    sets = [*([] if real else [f"task.families=[{families}]"]), *args.set, *([f"warmstart.base={args.model}"]
                                                                             if args.model else [])]
    cfg = load_config(config, sets)
    load_config(config, sets + args.compare)  # a misspelt --compare key fails now, not after the first run
    for path in [cfg.task.data, *cfg.task.eval_data] if real else []:
        if not (ROOT / path).is_file():
            sys.exit(f"{path} is not there: import and split the questions first (README, \"Forecasting data and "
                     "evaluation\": forecast-grpo data import forecastbench ..., forecast-grpo data split ...)")
    if cfg.warmstart.base:
        warm_start(config, sets)
    rows = [report(run(config, minutes, sets, out_dir, "learning"), args.label or " ".join(sets))]
    if args.tools:  # the same model and budget, trained and evaluated without the tools
        rows.append(report(run(config, minutes, sets + ["task.tools=[]"], out_dir, "no-tools"), "without tools"))
    if args.compare:
        rows.append(report(run(config, minutes, sets + args.compare, out_dir, "compare"), " ".join(args.compare)))
    print("\n".join(rows))


def _f(v, spec: str) -> str:
    return format(v, spec) if v is not None and math.isfinite(v) else "n/a"


def report(s: dict, label: str) -> str:
    """Print a run's before/after per evaluation set; returns its bench/README.md table row."""
    lv = s["reference_levels"]
    print(f"\n{label}: reference rewards (training questions): random {lv['ref_random']:.4f}, best constant "
          f"{lv['ref_constant']:.4f}, entropy floor {lv['ref_floor']:.4f}")
    print(f"{s['steps']} steps in {s['train_wall_s']:.0f}s of training ({s['process_wall_s']:.0f}s with start-up "
          f"and evaluations)")
    if "tools" in s:
        t = s["tools"]
        print(f"tools during training: {t['tool_calls']} calls, {t['tool_errors']} errors, "
              f"{t['leak_violations']} leak violations")
    cells = []
    for split in s["eval_after"]:
        b, a = s["eval_before"][split], s["eval_after"][split]
        if "vs" in a:  # real questions, held out: scored beside the baselines, with intervals
            print(f"{split}:\n" + "\n".join(heldout_lines(b, a)))
            cells.append(f"{split}: skill {_f(b['skill'], '+.2f')} → {_f(a['skill'], '+.2f')}, CE to market "
                         f"{_f(b['ce'], '.3f')} → {_f(a['ce'], '.3f')} (best constant {_f(a['ce_constant'], '.3f')}, "
                         f"market {_f(a['ce_floor'], '.3f')}; minus best constant "
                         f"{interval_text(a['vs']['best constant']['ce'])}, n {a['vs']['best constant']['ce']['n']})")
            continue
        shrink = 1 - a["ce_minus_floor"] / b["ce_minus_floor"]
        print(f"{split:18s} CE-floor {b['ce_minus_floor']:.4f} -> {a['ce_minus_floor']:.4f} (gap shrinks "
              f"{100 * shrink:.0f}%)   skill {b['skill']:+.3f} -> {a['skill']:+.3f}   reward {b['reward']:.4f} -> "
              f"{a['reward']:.4f}   format failures {100 * a['format_fail_rate']:.1f}%")
        by_truth = [(k, v) for k, v in a["mean_forecast_by_truth"].items() if v is not None]
        if len(by_truth) <= 12:
            print("         mean forecast by true probability: " + ", ".join(f"{k}: {v:.2f}" for k, v in by_truth))
        cells.append(f"{split} {a['skill']:+.2f} (CE−floor {a['ce_minus_floor']:.3f})")
    steps = s["metrics"]
    if steps:
        mean = {k: sum(m.get(k, 0.0) for m in steps) / len(steps) for k in ("gen_s", "train_s", "sync_s", "step_s")}
        tokens = sum(m.get("tokens_generated", 0) for m in steps) / max(1e-9, sum(m["gen_s"] for m in steps))
        print(f"a step: {mean['step_s']:.1f}s (generate {mean['gen_s']:.1f}s, train {mean['train_s']:.1f}s, sync "
              f"{mean['sync_s']:.2f}s; generation and training overlap with sync.overlap), generation "
              f"{tokens:.0f} tokens/s, over {len(steps)} steps")
    return f"| {label} | {' | '.join(cells)} | {s['steps']} | {s['train_wall_s'] / 60:.1f} min |"


if __name__ == "__main__":
    main()
