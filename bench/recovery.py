"""What surviving failures costs: a checkpoint (seconds and bytes, save and load), and a rollout worker's replacement.

    python bench/recovery.py [--model models/tiny] [--skip-100m] [--skip-replacement]

1. Checkpoint: a `Learner` (ZeRO-2 on CPU, one rank, after one optimizer step so Adam's moments exist) saves a
   complete checkpoint into a run folder (`Learner.save_checkpoint`: the DeepSpeed state with the optimizer, the
   Hugging Face folder) and a fresh `Learner` loads it (`load_checkpoint`); for the tiny model and for a Qwen2 of
   about 100M parameters built here with random weights (nothing is downloaded).
2. Replacement: the real job (`python -m cluster.train`, the dice recipe) with its rollout worker's process killed
   after 5 steps: seconds from the kill until Ray has restarted the worker and it holds the current weights (the
   driver's "is back" line), and until the batch it generated again has been trained on (that step's metrics line).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_100m(out: Path, tokenizer_from: str) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    model = Qwen2ForCausalLM(cfg).float()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out)  # ids stay below the tiny vocab
    return out


def checkpoint_cost(model: str, label: str) -> dict:
    import numpy as np

    from cluster.config import load_config
    from learner.learner import Learner
    from rollout.trajectory import TrajectoryBuilder

    run = Path(tempfile.mkdtemp(prefix="ckpt-"))
    cfg = load_config(None, [f"model.path={model}", "learner.zero_stage=2", "learner.lr=1e-4"]).learner_job()
    learner = Learner(cfg, 0, 1, "127.0.0.1", None, str(run))
    n_params = sum(p.numel() for p in learner.engine.module.parameters())
    b = TrajectoryBuilder()
    for g in range(4):
        for r in (-1.0, -0.5):
            b.add(list(range(3, 40)), list(range(40, 56)), [1] * 16, [-1.0] * 16, rewards=r, group_ids=g,
                  policy_version=0, forecasts=0.5, targets=0.5, p_true=0.5, truncated=False, question_ids=str(g))
    learner.train_step(b.build())
    t = time.perf_counter()
    files = learner.save_checkpoint("checkpoints/step_000001")
    save_s = time.perf_counter() - t
    fresh = Learner(cfg, 0, 1, "127.0.0.1", None, str(run))
    t = time.perf_counter()
    fresh.load_checkpoint("checkpoints/step_000001")
    load_s = time.perf_counter() - t
    same = all(np.array_equal(a.detach().numpy(), c.detach().numpy()) for a, c in
               zip(learner.engine.module.parameters(), fresh.engine.module.parameters()))
    total = sum(files.values())
    print(f"{label}: {n_params / 1e6:.1f}M parameters, checkpoint {total / 2**20:.1f} MiB in {len(files)} files "
          f"({total / n_params:.1f} bytes/parameter); save {save_s:.2f}s, load {load_s:.2f}s; "
          f"parameters equal after load: {same}", flush=True)
    return {"params": n_params, "bytes": total, "save_s": save_s, "load_s": load_s}


def replacement_cost(model: str) -> None:
    import psutil

    out = Path(tempfile.mkdtemp(prefix="replace-"))
    cmd = [sys.executable, "-m", "cluster.train", "--config", str(ROOT / "cluster/configs/dice-cpu.yaml"),
           "--set", f"model.path={model}", "--set", f"run.out_dir={out}", "--set", "run.name=r", "--set",
           "run.steps=20", "--set", "run.progress=false", "--set", "run.eval_samples=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""})
    metrics = out / "r" / "metrics.jsonl"

    def rows():
        return [json.loads(ln) for ln in metrics.read_text().splitlines()] if metrics.exists() else []

    while len(rows()) < 5:
        time.sleep(0.1)
    killed_at = time.monotonic()
    for p in psutil.process_iter(["cmdline"]):
        if "ray::RolloutWorker" in " ".join(p.info["cmdline"] or []):
            p.kill()
    while not any(r.get("dropped_worker_died") for r in rows()):  # the step whose batch was generated again
        time.sleep(0.05)
    trained_s = time.monotonic() - killed_at
    _, err = proc.communicate(timeout=600)
    lost = next(r for r in rows() if r.get("dropped_worker_died"))
    back = [ln for ln in err.splitlines() if "is back with policy version" in ln]
    restart_s = float(back[0].rsplit("after ", 1)[1].rstrip("s")) if back else float("nan")
    print(f"replacement: {lost['dropped_worker_died']} trajectories lost at step {lost['step']}; the restarted worker "
          f"held the current weights {restart_s:.1f}s after the driver saw the death; the batch it generated again "
          f"was trained on {trained_s:.1f}s after the kill (that step's generation took {lost['gen_s']:.2f}s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/tiny"))
    ap.add_argument("--skip-100m", action="store_true")
    ap.add_argument("--skip-replacement", action="store_true")
    args = ap.parse_args()
    checkpoint_cost(args.model, "tiny model")
    if not args.skip_100m:
        checkpoint_cost(str(build_100m(Path(tempfile.mkdtemp(prefix="q100m-")), args.model)), "Qwen2 ~100M")
    if not args.skip_replacement:
        replacement_cost(args.model)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
