"""`forecast-grpo wiki get|serve|snapshot` and `forecast-grpo news import`, as a user runs them."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from cluster import cli
from tests.fake_mediawiki import FakeMediaWiki

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake_server():
    with FakeMediaWiki() as wiki:
        yield wiki


@pytest.fixture
def fake(fake_server):
    fake_server.reset()
    return fake_server


@pytest.fixture
def job_yaml(fake, tmp_path):
    """A job config whose tools: section points at the fake, with fast retries."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "ignored here"}, "tools": {"wiki": {
        "endpoint": fake.url, "cache": str(tmp_path / "cache.sqlite"), "retries": 1, "backoff_s": 0.01}}}))
    return path


def wiki(*args) -> int:
    return cli.main(["wiki", *map(str, args)])


def test_get_prints_the_page_as_of_the_date(job_yaml, capsys):
    assert wiki("get", "Twitter", "--as-of", "2024-01-01", "--config", job_yaml) == 0
    out = capsys.readouterr().out
    assert out.startswith("title:     X (social network) (redirected from Twitter)\nrevid:     6101\n"
                          "timestamp: 2023-07-24T09:00:00Z\n\nX, formerly Twitter")
    assert wiki("get", "Twitter", "--as-of", "2016-01-01", "--config", job_yaml, "--json") == 0
    assert json.loads(capsys.readouterr().out) == {
        "title": "Twitter", "revid": 6002, "timestamp": "2015-10-05T12:00:00Z",
        "text": "Twitter is a social networking service (as of 2015-10-05). Jack Dorsey returned as CEO in 2015."}


@pytest.mark.parametrize("args, code", [
    (["Nowhere", "--as-of", "2020-01-01"], "missing"),
    (["ChatGPT", "--as-of", "2020-01-01"], "not_yet"),
    (["Paris", "--as-of", "2020-02-30"], "bad_request"),
])
def test_get_errors_as_json_with_a_nonzero_exit(job_yaml, capsys, args, code):
    assert wiki("get", *args, "--config", job_yaml, "--json") != 0
    assert json.loads(capsys.readouterr().out)["error"]["code"] == code


def test_get_refuses_a_lying_upstream_and_reports_upstream_failures(fake, job_yaml, capsys):
    fake.lie = 1.0
    assert wiki("get", "Bitcoin", "--as-of", "2018-01-01", "--config", job_yaml, "--json") == 1
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["code"] == "leak" and "refused" in err["message"]
    fake.lie = 0.0
    fake.inject("status", status=500, times=2)
    assert wiki("get", "Bitcoin", "--as-of", "2018-01-01", "--config", job_yaml) == 1
    assert "error: upstream: " in capsys.readouterr().err


def test_flags_override_the_config_and_offline_reads_the_cache_only(fake, job_yaml, tmp_path, capsys):
    other = tmp_path / "other.sqlite"
    assert wiki("get", "Paris", "--as-of", "2020-01-01", "--config", job_yaml, "--cache", other, "--json") == 0
    capsys.readouterr()
    n = len(fake.requests)
    assert wiki("get", "Paris", "--as-of", "2020-01-01", "--cache", other, "--offline", "--json") == 0
    assert json.loads(capsys.readouterr().out)["revid"] == 2001
    assert wiki("get", "Paris", "--as-of", "2021-01-01", "--cache", other, "--offline", "--json") == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "offline_miss"
    assert len(fake.requests) == n
    assert wiki("get", "Paris", "--as-of", "2020-01-01", "--endpoint", "ftp://x", "--cache", other) == 2
    assert "--endpoint: Value error, must be an http:// or https:// URL" in capsys.readouterr().err


def test_snapshot_export_then_import_elsewhere(job_yaml, tmp_path, capsys):
    assert wiki("get", "Twitter CEO", "--as-of", "2016-01-01", "--config", job_yaml) == 0
    snap = tmp_path / "snap.parquet"
    assert wiki("snapshot", "export", snap, "--config", job_yaml) == 0
    assert f"wrote {snap}: 2 revision rows, 1 lookup rows, 0 page rows, 0 search rows" in capsys.readouterr().out
    node = tmp_path / "node.sqlite"
    assert wiki("snapshot", "import", snap, "--cache", node) == 0
    assert "2 revision rows, 1 lookup rows" in capsys.readouterr().out
    assert wiki("get", "Twitter CEO", "--as-of", "2016-01-01", "--cache", node, "--offline", "--json") == 0
    assert json.loads(capsys.readouterr().out)["title"] == "Jack Dorsey"
    assert wiki("snapshot", "import", tmp_path / "absent.parquet", "--cache", node) == 2
    assert "snapshot not found" in capsys.readouterr().err


def test_news_import(tmp_path, capsys):
    src = tmp_path / "items.csv"
    src.write_text("date,title,summary,source,url\n2024-01-02,Storm,A storm came,wire,\nsoon,Bad,x,wire,\n")
    out = tmp_path / "corpus.parquet"
    assert cli.main(["news", "import", "csv", str(src), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "row 1: date: not an ISO date or datetime (got 'soon')" in text and "imported 1 items" in text
    assert out.is_file()
    src.write_text("date,title,summary,source,url\nsoon,Bad,x,wire,\n")
    assert cli.main(["news", "import", "csv", str(src), "-o", str(tmp_path / "none.parquet")]) == 1
    assert "nothing to write" in capsys.readouterr().err


def test_serve_standalone_binds_localhost_and_stops_on_ctrl_c(fake, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "wiki", "serve", "--port", "0", "--endpoint",
                             fake.url, "--cache", str(tmp_path / "c.sqlite")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[2]
        page = httpx.get(f"{url}/revision", params={"title": "Paris", "as_of": "2020-01-01"}, trust_env=False)
        assert page.json()["revid"] == 2001
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
