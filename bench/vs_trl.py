"""Head to head with TRL's GRPOTrainer on the identical dice task, in one command.

    python bench/vs_trl.py [--model models/tiny] [--steps 3000] [--repeats 3] [--timing-steps 100] [--long]

Both systems get the same starting model (loaded from the same folder), the same problems and prompt text (the TRL
harness's `task.py`; our dice family renders identically, which `tests/test_task_parity.py` checks), the same reward
and clipping, G = 8, 8 prompts per step, and the same completion limit (16 new tokens). TRL runs through the shared
peer harness (`../shared/peers/trl/run_trl.py`, stock TRL 1.16, transformers generation: its faster mode here); we
run `python -m cluster.train` with `--config cluster/configs/vs-trl.yaml`.

Printed side by side: seconds per step (median over `--repeats` short runs of each system, alternating, with the
spread), eval reward before/after and skill from one long run each, and the wall time until the training reward
(mean over 20 steps) first reaches -0.633, half the gap from the best constant answer to the entropy floor.
`--long` adds the second shape, timing only (`--long-timing-steps` per repeat): completions of up to 192 tokens
with reasoning before the answer (the reasoning prompt; the answer is the last tag), where generation dominates.
The learning run is 3000 steps by default: ours needs 1000-1500 steps before it conditions on the question
(bench/README.md). The last line is

    vs_trl: sec_per_step ours A trl B ratio R; skill ours S trl T        (ratio = B / A)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared" / "peers" / "trl"
HALF_GAP = -0.633
CONSTANT, FLOOR = -0.6931471805599453, -0.573459586976436  # the harness's reference levels for the 6-sided die


def trl_python() -> str:
    venv = Path(os.environ.get("TRL_VENV", "/tmp/venv-trl"))
    if not (venv / "bin" / "python").exists():
        print(f"setting up the TRL peer's venv at {venv} (about 2 minutes) ...", flush=True)
        subprocess.run(["bash", str(PEER / "setup.sh")], check=True, env={**os.environ, "VENV": str(venv)})
    return str(venv / "bin" / "python")


def run_trl(py: str, model: str, steps: int, out: Path, long: bool, eval_per_problem: int) -> dict:
    args = ["--model", model, "--steps", str(steps), "--out-dir", str(out), "--print-every", "50",
            "--eval-per-problem", str(eval_per_problem)]
    if long:
        # the reasoning shape: same wrapper around the unmodified harness, see trl_long_task.py
        cmd = [py, str(ROOT / "bench" / "trl_long_task.py"), *args, "--max-completion-length", "192"]
    else:
        cmd = [py, str(PEER / "run_trl.py"), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    if res.returncode != 0:
        sys.exit(f"TRL run failed:\n{res.stderr[-3000:]}")
    curve = json.loads((out / "curve.json").read_text())
    rewards = [c["reward"] for c in curve["curve"]]
    return {"sec_per_step": curve["sec_median_step"], "eval_before": curve["eval_before"]["reward"] if
            curve.get("eval_before") else None, "eval_after": curve["eval_after"]["reward"] if
            curve.get("eval_after") else None, "rewards": rewards, "step_seconds": curve["step_seconds"]}


def run_ours(model: str, steps: int, out: Path, long: bool, eval_samples: int, sets: list[str]) -> dict:
    cmd = [sys.executable, "-m", "cluster.train", "--config", str(ROOT / "cluster/configs/vs-trl.yaml"),
           "--set", f"model.path={model}", "--set", f"run.steps={steps}", "--set", f"run.out_dir={out.parent}",
           "--set", f"run.name={out.name}", "--set", "run.progress=false", "--set", f"run.eval_samples={eval_samples}"]
    if long:
        cmd += ["--set", "task.reasoning=true", "--set", "rollout.max_new_tokens=192"]
    for s in sets:
        cmd += ["--set", s]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    if res.returncode != 0:
        sys.exit(f"our run failed:\n{res.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    step_s = [m["step_s"] for m in metrics]
    ev = summary.get("eval_before", {}).get("train"), summary.get("eval_after", {}).get("train")
    return {"sec_per_step": statistics.median(step_s[1:]), "eval_before": ev[0]["reward"] if ev[0] else None,
            "eval_after": ev[1]["reward"] if ev[1] else None, "rewards": [m["reward_mean"] for m in metrics],
            "step_seconds": step_s}


def time_to_half_gap(rewards: list[float], step_seconds: list[float], window: int = 20) -> float | None:
    t = 0.0
    for i, s in enumerate(step_seconds):
        t += s
        if i + 1 >= window and statistics.fmean(rewards[i + 1 - window:i + 1]) >= HALF_GAP:
            return t
    return None


def skill(reward: float | None) -> float:
    return float("nan") if reward is None else (reward - CONSTANT) / (FLOOR - CONSTANT)


def timing(label: str, model: str, args, py: str, tmp: Path, long: bool, steps: int) -> tuple[float, float]:
    print(f"\n== {label} ==", flush=True)
    ours_t, trl_t = [], []
    for k in range(args.repeats):
        trl_t.append(run_trl(py, model, steps, tmp / f"trl-time-{label[:5]}-{k}", long, 0)["sec_per_step"])
        ours_t.append(run_ours(model, steps, tmp / f"ours-time-{label[:5]}-{k}", long, 1, args.set)["sec_per_step"])
        print(f"  repeat {k}: sec/step ours {ours_t[-1]:.3f}  trl {trl_t[-1]:.3f}", flush=True)
    a, b = statistics.median(ours_t), statistics.median(trl_t)
    print(f"{'':28s}{'ours':>12s}{'TRL':>12s}")
    print(f"{'sec/step (median)':28s}{a:12.3f}{b:12.3f}")
    print(f"{'sec/step (min..max)':28s}{min(ours_t):6.3f}..{max(ours_t):.3f}{min(trl_t):6.3f}..{max(trl_t):.3f}")
    return a, b


def learning(model: str, args, py: str, tmp: Path) -> tuple[float, float]:
    print(f"\n== learning: {args.steps} steps each ==", flush=True)
    trl = run_trl(py, model, args.steps, tmp / "trl-learn", False, 32)
    ours = run_ours(model, args.steps, tmp / "ours-learn", False, 32, args.set)
    print(f"{'':28s}{'ours':>12s}{'TRL':>12s}")
    for key in ("eval_before", "eval_after"):
        print(f"{key.replace('_', ' ') + ' reward':28s}{ours[key]:12.4f}{trl[key]:12.4f}")
    s_ours, s_trl = skill(ours["eval_after"]), skill(trl["eval_after"])
    print(f"{'skill after':28s}{s_ours:12.3f}{s_trl:12.3f}")
    for name, r in (("ours", ours), ("TRL", trl)):
        t = time_to_half_gap(r["rewards"], r["step_seconds"])
        print(f"{'time to reward -0.633 ' + name:28s}{'not reached' if t is None else f'{t:.0f} s':>12s}")
    return s_ours, s_trl


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/tiny"))
    ap.add_argument("--steps", type=int, default=3000, help="steps of the learning run of each system (0: timing only)")
    ap.add_argument("--timing-steps", type=int, default=100, help="steps of each timing run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long", action="store_true", help="also the >= 128-token reasoning shape (timing only)")
    ap.add_argument("--long-timing-steps", type=int, default=20)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override our config")
    args = ap.parse_args()
    py = trl_python()
    tmp = Path(tempfile.mkdtemp(prefix="vs-trl-"))
    a, b = timing("short: 64 completions of <= 16 tokens", args.model, args, py, tmp, False, args.timing_steps)
    if args.long:
        la, lb = timing("long: 64 completions of <= 192 tokens, reasoning first", args.model, args, py, tmp, True,
                        args.long_timing_steps)
    s, t = learning(args.model, args, py, tmp) if args.steps else (float("nan"), float("nan"))
    if args.long:
        print(f"\nlong shape: sec_per_step ours {la:.3f} trl {lb:.3f} ratio {lb / la:.2f}")
    print(f"vs_trl: sec_per_step ours {a:.3f} trl {b:.3f} ratio {b / a:.2f}; skill ours {s:.2f} trl {t:.2f}")


if __name__ == "__main__":
    main()
