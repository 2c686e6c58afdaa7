"""A stopped run continues exactly: a 3-step run resumed to 6 steps matches an uninterrupted 6-step run on steps 3-5
(same rewards, CE, losses, gradient norms), and a checkpoint folder that was not finished is skipped, saying why.

On-policy (sync.overlap false) on CPU, every step's sampling seeded from (run.seed, step, worker), fp32 everywhere:
the resumed learner holds the very parameters and Adam moments it saved, and the restarted engine gets the very
weights, so every number is reproduced to float precision: the tolerance (1e-6) is rounding, not drift. With tools
(the demo recipe) the same holds once the engine sees the turns in an order of their own, not the tools' latency's
(`rollout.deterministic_turns`)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
DICE = str(ROOT / "cluster/configs/dice-cpu.yaml")
ON_POLICY = ["sync.overlap=false", "sync.max_staleness=0", "run.eval_samples=2", "run.progress=false",
             "run.trajectories_every=0", "run.max_minutes=null"]


def run(*args, timeout=600):
    res = subprocess.run([sys.executable, "-m", "cluster.train", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "RAY_ADDRESS": ""})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def sets(*items):
    return [a for s in items for a in ("--set", s)]


def metrics(run_dir):
    return {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_a_resumed_run_matches_an_uninterrupted_one(tmp_path, tiny_model):
    common = [f"model.path={tiny_model}", f"run.out_dir={tmp_path}", *ON_POLICY]
    run("--config", DICE, *sets(*common, "run.name=whole", "run.steps=6"))
    run("--config", DICE, *sets(*common, "run.name=parts", "run.steps=3"))
    parts = tmp_path / "parts"
    # a later checkpoint that was cut short (no marker: the job died while saving) must be passed over
    shutil.copytree(parts / "checkpoints" / "step_000003", parts / "checkpoints" / "step_000005")
    (parts / "checkpoints" / "step_000005" / "COMPLETE").unlink()
    res = run("--resume", str(parts), *sets("run.steps=6"))
    assert "skipping checkpoint" in res.stderr and "step_000005" in res.stderr and "no COMPLETE marker" in res.stderr
    assert "resumed from" in res.stdout and "step 3, policy version 3" in res.stdout

    whole, resumed = metrics(tmp_path / "whole"), metrics(parts)
    assert sorted(resumed) == sorted(whole) == list(range(6))  # steps 0-2 kept once, 3-5 redone from step 3
    for step in range(6):
        for key in ("reward_mean", "ce_mean", "loss", "grad_norm", "kl", "tokens_generated"):
            assert resumed[step][key] == pytest.approx(whole[step][key], rel=1e-6, abs=1e-6), (step, key)
    summary = json.loads((parts / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["resumed_from"] == "checkpoints/step_000003"


def test_a_resumed_lora_run_matches_an_uninterrupted_one(tmp_path, tiny_model):
    """The dice recipe with LoRA adapters (`learner.lora`), resumed from the checkpoint a 6-step run took at step 3:
    the checkpoint holds the adapter (peft's format), the merged model, and the adapters' optimizer; steps 3-5
    again, the same numbers. The policy moves off the base model (KL > 0 to it) and its versions advance."""
    run("--config", DICE, *sets(f"model.path={tiny_model}", f"run.out_dir={tmp_path}", *ON_POLICY, "run.name=whole",
                                "run.steps=6", "run.save_every=3", "learner.lora.r=8"))
    whole_dir, parts = tmp_path / "whole", tmp_path / "parts"
    for step in ("step_000003", "step_000006"):
        assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "model.safetensors"} <= set(
            json.loads((whole_dir / "checkpoints" / step / "COMPLETE").read_text())["files"])
    shutil.copytree(whole_dir, parts)
    (parts / "checkpoints" / "step_000006" / "COMPLETE").unlink()  # as if the job had died while saving it
    res = run("--resume", str(parts), *sets("run.steps=6"))
    assert "resumed from" in res.stdout and "step 3, policy version 3" in res.stdout

    whole, resumed = metrics(whole_dir), metrics(parts)
    assert [whole[s]["policy_version"] for s in range(6)] == list(range(6))
    assert all(whole[s]["kl"] > 0 for s in range(1, 6))
    for step in range(3, 6):
        for key in ("reward_mean", "ce_mean", "loss", "grad_norm", "kl", "tokens_generated"):
            assert resumed[step][key] == pytest.approx(whole[step][key], rel=1e-6, abs=1e-6), (step, key)


def test_a_resumed_run_with_tools_matches_an_uninterrupted_one(tmp_path, tiny_model, tool_world_files):
    """The demo recipe as it is (tool conversations in `rollout.deterministic_turns` order, generation overlapped
    with training), resumed from the checkpoint a 6-step run took at step 3, which holds the batch generated for
    step 3: steps 3-5 again, the same numbers. Without the deterministic order they differed by up to 13%."""
    world = [f"tools.wiki.snapshot={tool_world_files / 'wiki.parquet'}", f"tools.wiki.tokenizer={tiny_model}",
             f"tools.news.corpus={tool_world_files / 'news.parquet'}", f"tools.wiki.cache={tmp_path / 'cache.sqlite'}"]
    run("--config", str(ROOT / "cluster/configs/demo-cpu.yaml"),
        *sets(f"model.path={tiny_model}", *world, f"run.out_dir={tmp_path}", "run.name=whole", "run.steps=6",
              "run.save_every=3", "run.eval_max_questions=2", "run.eval_samples=1", "run.progress=false",
              "run.trajectories_every=0", "run.max_minutes=null"))
    parts = tmp_path / "parts"
    shutil.copytree(tmp_path / "whole", parts)
    (parts / "checkpoints" / "step_000006" / "COMPLETE").unlink()  # as if the job had died while saving it
    res = run("--resume", str(parts), *sets("run.steps=6"))
    assert "resumed from" in res.stdout and "step 3, policy version 3" in res.stdout

    whole, resumed = metrics(tmp_path / "whole"), metrics(parts)
    assert sorted(resumed) == sorted(whole) == list(range(6))
    assert all(whole[s]["tool_calls"] > 0 for s in range(6))
    for step in range(3, 6):
        for key in ("reward_mean", "ce_mean", "loss", "grad_norm", "kl", "tokens_generated", "tool_calls",
                    "tool_shared_answers", "turns_mean"):
            assert resumed[step][key] == pytest.approx(whole[step][key], rel=1e-6, abs=1e-6), (step, key)
