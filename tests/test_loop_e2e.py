"""The real loop, as a user runs it (`python -m cluster.train`): real Ray, vLLM and DeepSpeed ZeRO-2 and ZeRO-3."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from rollout import questions as qio
from rollout import synthetic
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def run_driver(tmp_path, model, *sets, timeout=600):
    cmd = [sys.executable, "-m", "cluster.train", "--config", str(ROOT / "cluster/configs/dice-cpu.yaml"),
           "--set", f"model.path={model}", "--set", f"run.out_dir={tmp_path}", "--set", "run.progress=false",
           "--set", "run.eval_samples=2", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name,sets,expected_versions,bound,sync_every", [
    # ZeRO-2, object store, weights every 2 steps, generation overlapping training: versions lag by up to 2 steps
    ("zero2-overlap", ["learner.zero_stage=2", "sync.every=2", "sync.overlap=true", "sync.max_staleness=2",
                       "sync.transport=object_store"], [0, 0, 0, 2, 2, 4], 2, 2),
    # ZeRO-3 over two learner ranks, collective (gloo) broadcast every step: fully on-policy. One question, a die's
    # "at least 2" (p* 5/6), which the model starts out answering about 0.1: the reward rises within the six steps
    ("zero3-collective", ["learner.zero_stage=3", "learner.world_size=2", "learner.num_cpus=0.5",
                          "sync.transport=collective", "sync.overlap=false", "task.source=parquet",
                          "task.data={one}", "task.families=[]"], [0, 1, 2, 3, 4, 5], 0, 1),
])
def test_loop_runs_and_checkpoint_reloads(tmp_path, tiny_model, name, sets, expected_versions, bound, sync_every):
    steps = len(expected_versions)
    one = tmp_path / "one.parquet"
    qio.write_parquet([q for q in synthetic.questions(["dice"]) if q.id == "dice/6/ge2"], one)
    sets = [s.format(one=one) for s in sets]
    res = run_driver(tmp_path, tiny_model, f"run.name={name}", f"run.steps={steps}", "run.save_every=3",
                     "run.trajectories_every=2", *sets)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    run_dir = tmp_path / name
    assert "=== forecast-grpo summary ===" in res.stdout and str(run_dir) in res.stdout

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["learner"]["zero_stage"] == int(sets[0][-1]) and cfg["run"]["steps"] == steps

    m = read_metrics(run_dir)
    assert [r["step"] for r in m] == list(range(steps))
    for r in m:
        for key in ("step", "policy_version", "reward_mean", "reward_std", "ce_mean", "format_fail_rate",
                    "zero_var_groups", "clip_frac", "kl", "grad_norm", "tokens_generated", "gen_s", "train_s",
                    "sync_s", "wall_s"):
            assert key in r, key
        assert r["tokens_generated"] > 0 and r["reward_mean"] <= 0
        assert r["max_staleness_seen"] <= bound and r["dropped_stale"] == 0
    assert [r["policy_version"] for r in m] == expected_versions
    assert all(r["step"] - r["policy_version"] <= bound for r in m)
    assert [r["sync_s"] > 0 for r in m] == [(r["step"] + 1) % sync_every == 0 for r in m]

    traj = sorted((run_dir / "trajectories").glob("step_*.parquet"))
    assert [p.name for p in traj] == [f"step_{s:06d}.parquet" for s in range(0, steps, 2)]
    t = pq.read_table(traj[-1])
    assert t.num_rows == 64
    for toks, mask, lp, plen in zip(t["tokens"].to_pylist(), t["loss_mask"].to_pylist(),
                                    t["sampler_logprobs"].to_pylist(), t["prompt_len"].to_pylist()):
        assert len(toks) == len(mask) == len(lp)
        assert not any(mask[:plen]) and all(mask[plen:]) and all(v <= 0 for v in lp)

    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step_000003", f"step_{steps:06d}"]
    assert not list((run_dir / "checkpoints").glob("*.partial"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpts[-1])
    model = AutoModelForCausalLM.from_pretrained(ckpts[-1], dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    trained = dict(model.named_parameters())
    assert set(trained) == set(dict(base.named_parameters()))
    assert any(not torch.equal(p, trained[n]) for n, p in base.named_parameters())  # it did train
    prompt = tok.apply_chat_template([{"role": "user", "content": "A fair 6-sided die is rolled. What is the "
                                       "probability the result is at least 3? Answer with <answer>p</answer>."}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**ids, max_new_tokens=16, do_sample=True, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.startswith("<answer>"), text

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and not summary["stopped_early"]
    if "task.source=parquet" in sets:  # the direction, where it is certain: every group pulls toward p*
        rewards = [r["reward_mean"] for r in m]
        assert np.mean(rewards[-2:]) > np.mean(rewards[:2]) + 0.1, rewards
    else:
        assert np.isfinite(summary["eval_after"]["train"]["skill"])
