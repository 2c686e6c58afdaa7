"""Bad input and failures end in a clear error within a bounded time, never a hang; Ctrl-C saves and exits; a dead
rollout worker or tool service is replaced and the run goes on; a dead learner ends the job naming the rank and the
last checkpoint, from which --resume continues."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pyarrow.parquet as pq
import pytest

from rollout import synthetic
from tests.conftest import ROOT

DEMO = str(ROOT / "cluster/configs/dice-cpu.yaml")
TOOLS = str(ROOT / "cluster/configs/demo-cpu.yaml")


def cli(*args, env=None, timeout=120):
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "cluster.train", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "RAY_ADDRESS": "", **(env or {})})
    return res, time.monotonic() - t0


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  lrr: 0.1\nrollout:\n  group_size: many\n")
    res, _ = cli("--config", str(bad))
    assert res.returncode == 2
    assert f"{bad}: unknown key 'learner.lrr'" in res.stderr
    assert f"{bad}: rollout.group_size:" in res.stderr and "'many'" in res.stderr


def test_bad_override_names_the_set():
    res, _ = cli("--config", DEMO, "--set", "learner.lrr=1")
    assert res.returncode == 2 and "--set learner.lrr: unknown key 'learner.lrr'" in res.stderr
    res, _ = cli("--config", DEMO, "--set", "learner.lr=fast")
    assert res.returncode == 2 and "learner.lr" in res.stderr and "'fast'" in res.stderr
    res, _ = cli("--config", DEMO, "--set", "sync.every=3")  # staleness bound too small for the cadence
    assert res.returncode == 2 and "sync.max_staleness" in res.stderr


def test_missing_model_path(tmp_path):
    res, took = cli("--config", DEMO, "--set", f"model.path={tmp_path}/nope")
    assert res.returncode == 2 and "model.path" in res.stderr and "does not exist" in res.stderr
    assert took < 60


@pytest.mark.parametrize("address,connect_s", [("127.0.0.1:1", 5), ("10.255.255.1:6379", 3)])
def test_unreachable_ray_address(tiny_model, address, connect_s):
    res, took = cli("--config", DEMO, "--set", f"model.path={tiny_model}", "--set", f"timeouts.connect_s={connect_s}",
                    env={"RAY_ADDRESS": address})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "cannot reach the Ray cluster" in res.stderr and address in res.stderr
    assert took < connect_s + 60  # Ray's own connect attempt is bounded (about 20 s here)


def _start(tmp_path, model, *sets, config=DEMO, env=None):
    args = [sys.executable, "-m", "cluster.train", "--config", config, "--set", f"model.path={model}",
            "--set", f"run.out_dir={tmp_path}", "--set", "run.name=f", "--set", "run.progress=false",
            "--set", "run.eval_samples=2", *[a for s in sets for a in ("--set", s)]]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ADDRESS": "", **(env or {})})


def _wait_for_line(proc, prefix: str, timeout=240) -> None:
    """Read the job's stdout (started with PYTHONUNBUFFERED=1) until a line starts with `prefix`."""
    found = threading.Event()

    def read():
        for line in proc.stdout:
            if line.startswith(prefix):
                found.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found.is_set():
        proc.kill()
        raise AssertionError(f"no line {prefix!r} within {timeout}s: {proc.communicate()[1][-3000:]}")


def _wait_for_steps(tmp_path, proc, n, timeout=240):
    metrics = tmp_path / "f" / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[1][-3000:])
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("the run did not reach its first steps")


def _kill(proc, actor: str) -> None:
    """Kill the job's own `actor` processes: the job starts its Ray, whose processes are its descendants (another
    run's on this machine, a benchmark's, are left alone)."""
    def named(p: psutil.Process) -> bool:
        try:
            return f"ray::{actor}" in " ".join(p.cmdline())
        except psutil.NoSuchProcess:  # ended since it was listed
            return False

    victims = [p for p in psutil.Process(proc.pid).children(recursive=True) if named(p)]
    assert victims, f"no {actor} process found under the job"
    for p in victims:
        p.kill()


def _metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_dead_rollout_worker_without_restarts_is_a_clear_error(tmp_path, tiny_model):
    proc = _start(tmp_path, tiny_model, "run.steps=100000", "rollout.max_restarts=0")
    _wait_for_steps(tmp_path, proc, 2)
    t0 = time.monotonic()
    _kill(proc, "RolloutWorker")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert "rollout worker 0 died" in err
    assert time.monotonic() - t0 < 60


@pytest.mark.e2e
def test_dead_rollout_worker_is_replaced_and_the_run_goes_on(tmp_path, tiny_model):
    """Killed twice: while the evaluation before training asks it the held-out questions (the training set's is
    done), and during training. Each time Ray restarts it, it gets the learner's weights, and what it lost is asked
    again: the evaluation's batch (counted), the step's share (counted as dropped)."""
    proc = _start(tmp_path, tiny_model, "run.steps=14", "run.eval_samples=8", "run.eval_batch_questions=2",
                  env={"PYTHONUNBUFFERED": "1"})
    _wait_for_line(proc, "eval train:")  # printed when the training set's evaluation ends: the held-out one begins
    _kill(proc, "RolloutWorker")
    _wait_for_steps(tmp_path, proc, 3, timeout=400)
    _kill(proc, "RolloutWorker")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "rollout worker 0 died evaluating questions" in err and "of the 'heldout' set: asking them again" in err
    assert "rollout worker 0 died during step" in err
    assert err.count("is back with policy version") == 2 and "is back with policy version 0 " in err
    before = json.loads((tmp_path / "f" / "summary.json").read_text())["eval_before"]
    assert before["train"]["batches_asked_again"] == 0 and before["heldout"]["batches_asked_again"] >= 1
    assert before["heldout"]["questions"] == len(synthetic.questions(["dice"], "heldout"))  # each scored once
    m = _metrics(tmp_path)
    assert {e["set"]: e["batches_asked_again"] for e in m[0]["evals"]} == \
        {"train": 0, "heldout": before["heldout"]["batches_asked_again"]}
    assert [r["step"] for r in m] == list(range(14))  # no step lost, none done twice
    lost = [r for r in m if r.get("dropped_worker_died")]
    assert len(lost) == 1 and lost[0]["dropped_worker_died"] == 64
    # the step whose batch was lost trained on a whole batch, generated again with the current weights
    assert lost[0]["groups"] == 8 and lost[0]["dropped_stale"] == 0


@pytest.mark.e2e
def test_dead_learner_names_the_rank_and_the_checkpoint_and_resume_continues(tmp_path, tiny_model):
    proc = _start(tmp_path, tiny_model, "run.steps=100000", "run.save_every=2")
    _wait_for_steps(tmp_path, proc, 3)
    deadline = time.monotonic() + 120
    while not (tmp_path / "f" / "checkpoints" / "step_000002" / "COMPLETE").exists():
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.2)
    _kill(proc, "Learner")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert "learner rank 0 died" in err and "last complete checkpoint" in err and "--resume" in err
    # the tiny model's steps are short: the job may have saved more checkpoints by the time the kill landed
    checkpoints = tmp_path / "f" / "checkpoints"
    last = max(int(d.name.removeprefix("step_")) for d in checkpoints.iterdir() if (d / "COMPLETE").exists())
    files = sorted(p.name for p in (checkpoints / f"step_{last:06d}").iterdir())
    # nothing left to train (run.steps reached): the run ends on the checkpoint it resumed from, which stays whole
    res, _ = cli("--resume", str(tmp_path / "f"), "--set", f"run.steps={last}", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (checkpoints / f"step_{last:06d}").iterdir()) == files
    res, _ = cli("--resume", str(tmp_path / "f"), "--set", f"run.steps={last + 2}", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in _metrics(tmp_path)] == list(range(last + 2))


@pytest.mark.e2e
def test_dead_tool_service_is_restarted_on_its_cache(tmp_path, tiny_model, tool_world_files):
    """The service is offline (its cache is all it has) and restarted with the job's config, which imports the
    snapshot again: emptied before the kill, so that the pages the restarted service answers can only come from the
    cache it had (a fresh cache would miss every call). Calls waiting on it when it dies get a tool error
    (tests/test_tools_service.py kills one under a waiting call)."""
    cache, snapshot = tmp_path / "cache.sqlite", tmp_path / "wiki.parquet"
    shutil.copy(tool_world_files / "wiki.parquet", snapshot)
    proc = _start(tmp_path, tiny_model, "run.steps=12", f"tools.wiki.cache={cache}", f"tools.wiki.snapshot={snapshot}",
                  f"tools.wiki.tokenizer={tiny_model}", "run.eval_max_questions=4", config=TOOLS)
    _wait_for_steps(tmp_path, proc, 3)
    pq.write_table(pq.read_table(snapshot).slice(0, 0), snapshot)  # the restart imports nothing
    _kill(proc, "ToolService")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "tool service restarted" in err
    m = _metrics(tmp_path)
    assert [r["step"] for r in m] == list(range(12))
    for r in m[-3:]:  # the last steps, long after the restart: answered from the cache it had
        assert r["tool_calls"] > 0 and r.get("cache_hit_rate") == 1.0, r  # offline: what it answers is a hit
        assert r.get("tool_errors_offline_miss", 0) < 0.5 * r["tool_calls"], r  # a fresh cache: every call


@pytest.mark.e2e
def test_ctrl_c_saves_and_exits_cleanly(tmp_path, tiny_model):
    proc = _start(tmp_path, tiny_model, "run.steps=100000")
    _wait_for_steps(tmp_path, proc, 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] >= 2
    ckpt = tmp_path / "f" / "checkpoints" / f"step_{summary['steps']:06d}"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.json").is_file()
    assert "stopped early" in out


@pytest.mark.e2e
def test_remote_waits_time_out_naming_the_role(tmp_path, tiny_model):
    proc = _start(tmp_path, tiny_model, "run.steps=3", "timeouts.generate_s=0.05", "timeouts.train_s=0.05")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "timed out after" in err and ("rollout worker 0" in err or "learner rank 0" in err)
