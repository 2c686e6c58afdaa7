"""Bad input and failures end in a clear error within a bounded time, never a hang; Ctrl-C saves and exits; a dead
rollout worker or tool service is replaced and the run goes on; a dead learner ends the job naming the rank and the
last checkpoint, from which --resume continues."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

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


def _start(tmp_path, model, *sets, config=DEMO):
    args = [sys.executable, "-m", "cluster.train", "--config", config, "--set", f"model.path={model}",
            "--set", f"run.out_dir={tmp_path}", "--set", "run.name=f", "--set", "run.progress=false",
            "--set", "run.eval_samples=2", *[a for s in sets for a in ("--set", s)]]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""})


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


def _kill(actor: str) -> None:
    victims = [p for p in psutil.process_iter(["cmdline"]) if f"ray::{actor}" in " ".join(p.info["cmdline"] or [])]
    assert victims, f"no {actor} process found"
    for p in victims:
        p.kill()


def _metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_dead_rollout_worker_without_restarts_is_a_clear_error(tmp_path, tiny_model):
    proc = _start(tmp_path, tiny_model, "run.steps=100000", "rollout.max_restarts=0")
    _wait_for_steps(tmp_path, proc, 2)
    t0 = time.monotonic()
    _kill("RolloutWorker")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert "rollout worker 0 died" in err
    assert time.monotonic() - t0 < 60


@pytest.mark.e2e
def test_dead_rollout_worker_is_replaced_and_the_run_goes_on(tmp_path, tiny_model):
    proc = _start(tmp_path, tiny_model, "run.steps=14")
    _wait_for_steps(tmp_path, proc, 3)
    _kill("RolloutWorker")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "rollout worker 0 died during step" in err and "is back with policy version" in err
    m = _metrics(tmp_path)
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
    _kill("Learner")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert "learner rank 0 died" in err and "last complete checkpoint" in err and "--resume" in err
    res, _ = cli("--resume", str(tmp_path / "f"), "--set", "run.steps=6", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in _metrics(tmp_path)] == list(range(6))


@pytest.mark.e2e
def test_dead_tool_service_is_restarted_on_its_cache(tmp_path, tiny_model, tool_world_files):
    cache = tmp_path / "cache.sqlite"
    proc = _start(tmp_path, tiny_model, "run.steps=12", f"tools.wiki.cache={cache}",
                  f"tools.wiki.snapshot={tool_world_files / 'wiki.parquet'}", f"tools.wiki.tokenizer={tiny_model}",
                  "run.eval_max_questions=4", config=TOOLS)
    _wait_for_steps(tmp_path, proc, 3)
    size = cache.stat().st_size
    _kill("ToolService")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "tool service restarted" in err
    m = _metrics(tmp_path)
    assert [r["step"] for r in m] == list(range(12))
    assert m[-1]["tool_calls"] > 0 and m[-1]["cache_hit_rate"] > 0  # the restarted service answers from its cache
    assert cache.stat().st_size >= size


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
