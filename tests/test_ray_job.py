"""`ray job submit`, for real: a head started with `ray start --head` on 127.0.0.1 with the dashboard, the demo
recipe submitted as the README says (`ray job submit --working-dir . -- python -m cluster.train --config
cluster/configs/demo-cpu.yaml`: `models/` does not travel, and the job writes the tool world it needs into its working
directory; only the tiny model is given, whose build would take minutes), its logs and its run folder (a `file://`
URI: a folder the driver does not own); then a second job, on the dice recipe, its training metrics scraped from
the node's metrics export port while it runs, stopped with `ray job stop` mid-run, which must save a complete
checkpoint and end cleanly; then the head is stopped (its own processes only: `ray stop` would end every Ray on the
machine, a benchmark's or another test run's too).

The job asks for the grace its stop needs: `RAY_JOB_STOP_WAIT_TIME_S` in its runtime_env (Ray's default, 3 s,
is less than a step and a save of a real model take)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from learner.learner import free_port
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
RUNTIME_ENV = {"excludes": [".git", ".venv", "models", "runs"], "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    ports = {k: free_port() for k in ("gcs", "dashboard", "agent", "metrics")}
    env = {**os.environ, "RAY_ADDRESS": f"http://127.0.0.1:{ports['dashboard']}"}
    env.pop("RAY_JOB_STOP_WAIT_TIME_S", None)
    # a local ray.init() leaves ~/.ray/auth_token, and a head started after it asks for the token
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"
    log = tmp_path_factory.mktemp("head") / "ray-start.log"
    # --block: the head lives as long as this process, and takes its own processes with it when it is terminated
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={ports['gcs']}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={ports['dashboard']}", f"--metrics-export-port={ports['metrics']}",
                             f"--dashboard-agent-listen-port={ports['agent']}", "--num-cpus=2",
                             "--disable-usage-stats"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not _answers(f"http://127.0.0.1:{ports['dashboard']}/api/version"):
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield env, ports, tmp_path_factory.mktemp("jobs")
    finally:
        head.terminate()
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500  # 401 under token auth: up all the same
    except httpx.HTTPError:
        return False


def ray_cli(env, *args, timeout=600):
    return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def submit(env, job_id, out, tiny_model, *sets, config="cluster/configs/dice-cpu.yaml", wait=False):
    cmd = ["job", "submit", "--working-dir", ".", "--runtime-env-json", json.dumps(RUNTIME_ENV),
           "--submission-id", job_id, *([] if wait else ["--no-wait"]), "--", sys.executable, "-m", "cluster.train",
           "--config", config]
    for s in (f"model.path={tiny_model}", f"run.out_dir=file://{out}", f"run.name={job_id}", "run.progress=false",
              "run.eval_samples=2", "run.max_minutes=null", *sets):
        cmd += ["--set", s]
    res = ray_cli(env, *cmd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def status(env, job_id) -> str:
    """The job's state from `ray job status`: "Job 'ID' succeeded" / "was stopped" / "failed" once it has ended,
    "Status for job 'ID': STATE" before."""
    out = ray_cli(env, "job", "status", job_id, timeout=60).stdout
    ended = {"succeeded": "SUCCEEDED", "was stopped": "STOPPED", "failed": "FAILED"}
    for line in reversed(out.splitlines()):
        if f"Status for job '{job_id}':" in line:
            return line.rsplit(":", 1)[1].strip()
        for words, state in ended.items():
            if f"Job '{job_id}' {words}" in line:
                return state
    return ""


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def metrics_export_port(env, ports) -> int:
    """The node's MetricsExportPort, as `ray.nodes()` reports it (asked from a process of its own, with the head's
    auth mode)."""
    out = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='127.0.0.1:%d', log_to_driver=False); "
                          "print(ray.nodes()[0]['MetricsExportPort'])" % ports["gcs"]],
                         capture_output=True, text=True, timeout=120, env={**env, "RAY_ADDRESS": ""})
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-3000:]
    return int(out.stdout.strip().splitlines()[-1])


def scrape(port, run) -> dict:
    """The training metrics of `run` in the node's Prometheus export: name -> value (summed over other labels)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_forecast_grpo_") and s.labels.get("run") == run:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def test_submit_runs_to_success(head, tiny_model):
    env, ports, out = head
    submit(env, "job1", out, tiny_model, f"tools.wiki.tokenizer={tiny_model}", "run.steps=3",
           "run.eval_max_questions=1", config="cluster/configs/demo-cpu.yaml")
    assert wait_for(lambda: status(env, "job1") in ("SUCCEEDED", "FAILED", "STOPPED") and status(env, "job1"), 600,
                    "job1 to end") == "SUCCEEDED"
    logs = ray_cli(env, "job", "logs", "job1").stdout
    assert "writing the tool world's wiki.parquet to models/tool-world/wiki.parquet" in logs
    assert "=== forecast-grpo summary ===" in logs and "step    2" in logs and "leaks 0" in logs
    run_dir = out / "job1"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(3)) and all(r["tool_calls"] > 0 for r in rows)
    assert (run_dir / "checkpoints" / "step_000003" / "COMPLETE").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3


def test_metrics_are_exported_and_job_stop_saves_a_complete_checkpoint(head, tiny_model):
    """A job that runs until it is stopped: its metrics are scraped while it runs (a 30-step job can end before the
    node's next export), then `ray job stop` ends it."""
    env, ports, out = head
    port = metrics_export_port(env, ports)
    assert port == ports["metrics"]
    submit(env, "job2", out, tiny_model, "run.steps=100000")
    run_dir = out / "job2"
    seen = wait_for(lambda: (m := scrape(port, "job2")).get("ray_forecast_grpo_step", 0) >= 1 and m, 300,
                    "the job's metrics in the node's export")
    assert seen["ray_forecast_grpo_reward_mean"] < 0 and seen["ray_forecast_grpo_tokens_per_second"] > 0
    assert 0 <= seen["ray_forecast_grpo_format_fail_rate"] <= 1 and seen["ray_forecast_grpo_staleness"] in (0, 1)
    assert seen.get("ray_forecast_grpo_leak_violations_total", 0) == 0
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 2
    stop = ray_cli(env, "job", "stop", "job2")
    assert stop.returncode == 0, stop.stderr[-2000:]
    assert wait_for(lambda: status(env, "job2") in ("SUCCEEDED", "FAILED", "STOPPED") and status(env, "job2"), 300,
                    "job2 to end") == "STOPPED"
    # Ray reports STOPPED once it has sent SIGTERM; the driver then finishes its step and saves (within the grace)
    wait_for(lambda: (run_dir / "summary.json").exists(), 150, "job2's summary after the stop")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] >= 2
    ckpt = run_dir / "checkpoints" / f"step_{summary['steps']:06d}"
    marker = json.loads((ckpt / "COMPLETE").read_text())
    assert all((ckpt / name).stat().st_size == size for name, size in marker["files"].items())
    logs = ray_cli(env, "job", "logs", "job2").stdout
    assert "SIGTERM: finishing this step" in logs
    shutil.rmtree(run_dir)
