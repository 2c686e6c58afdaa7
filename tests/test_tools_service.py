"""The tool service over real HTTP with ToolClient: every endpoint, error statuses, Prometheus metrics, a snapshot
served offline, and a dead, slow or garbled service as a tool error."""

import ast
import asyncio
import datetime as dt
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_mediawiki import FakeMediaWiki
from tests.test_tools_news import synthetic_corpus
from tools.client import ToolClient
from tools.config import ToolsConfig
from tools.errors import ToolError
from tools.news import write_corpus
from tools.service import run_app_in_thread, serve_in_thread

D = dt.date
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake_server():
    with FakeMediaWiki() as wiki:
        yield wiki


@pytest.fixture
def fake(fake_server):
    fake_server.reset()
    return fake_server


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("news") / "corpus.parquet"
    write_corpus(synthetic_corpus(), path)
    return path


def tools_config(fake, cache, **wiki) -> ToolsConfig:
    return ToolsConfig(wiki=fake.config(cache, **wiki))


@pytest.fixture
def service(fake, corpus, tmp_path):
    cfg = tools_config(fake, tmp_path / "cache.sqlite")
    cfg.news.corpus = str(corpus)
    running = serve_in_thread(cfg)
    yield running
    running.stop()


def call(url, *calls, **client_kw):
    """Run `calls` (functions of a ToolClient returning coroutines); each result, or the ToolError it raised."""
    async def main():
        client = ToolClient(url, **client_kw)
        out = []
        try:
            for c in calls:
                try:
                    out.append(await c(client))
                except ToolError as e:
                    out.append(e)
        finally:
            await client.aclose()
        return out
    return asyncio.run(main())


def metrics(url) -> dict:
    """{(name, sorted label items): value} from /metrics."""
    text = httpx.get(url + "/metrics", trust_env=False).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_revision_endpoint_answers_the_contract(service):
    miss, hit = call(service.url, lambda c: c.revision("twitter", D(2024, 1, 1)),
                     lambda c: c.revision("twitter", D(2024, 1, 1)))
    assert miss == {"title": "X (social network)", "requested_title": "twitter", "revid": 6101,
                    "timestamp": "2023-07-24T09:00:00Z", "as_of": "2024-01-01",
                    "text": "X, formerly Twitter, is a social network owned by X Corp. (as of 2023-07-24).",
                    "truncated": False, "redirected_from": ["Twitter"], "cache": "miss"}
    assert hit == {**miss, "cache": "hit"}


def test_long_pages_are_cut_to_the_token_budget(tmp_path):
    long_page = {"pages": {"Long": [{"revid": 1, "timestamp": "2020-01-01T00:00:00Z", "content": "word " * 400}]}}
    with FakeMediaWiki(long_page) as wiki:
        running = serve_in_thread(ToolsConfig(wiki=wiki.config(tmp_path / "c.sqlite", text_max_tokens=16)))
        try:
            (page,) = call(running.url, lambda c: c.revision("Long", D(2021, 1, 1)))
        finally:
            running.stop()
    assert page["truncated"] and page["text"] == ("word " * 400)[:64]


def test_errors_have_their_codes_and_statuses(service, fake):
    cases = {
        "title=Nowhere&as_of=2020-01-01": (404, "missing"),
        "title=ChatGPT&as_of=2020-01-01": (404, "not_yet"),
        "title=A|b&as_of=2020-01-01": (400, "invalid_title"),
        "title=Paris&as_of=2020-13-01": (400, "bad_request"),
        "title=Paris&as_of=": (400, "bad_request"),
        "title=&as_of=2020-01-01": (400, "bad_request"),
    }
    for query, (status, code) in cases.items():
        r = httpx.get(f"{service.url}/revision?{query}", trust_env=False)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), query
    fake.inject("status", status=500, times=3)
    r = httpx.get(f"{service.url}/revision?title=Bitcoin&as_of=2018-01-01", trust_env=False)
    assert (r.status_code, r.json()["error"]["code"]) == (502, "upstream")
    fake.lie = 1.0
    (leak,) = call(service.url, lambda c: c.revision("Bitcoin", D(2018, 1, 1)))
    assert leak.code == "leak" and "refused" in leak.message
    r = httpx.get(f"{service.url}/search?q=x&as_of=2020-01-01&limit=0", trust_env=False)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "bad_request")


def test_search_and_news_endpoints(service):
    _, search, again, news, empty = call(  # search finds the pages the cache holds, as they stood then
        service.url, lambda c: c.revision("2024 Summer Olympics", D(2020, 1, 1)),
        lambda c: c.search("Olympics", D(2020, 1, 1)), lambda c: c.search("Olympics", D(2020, 1, 1)),
        lambda c: c.news("election", D(2024, 6, 30), limit=3), lambda c: c.news("election", D(2023, 6, 30)))
    assert (search["as_of"], search["query"], search["cache"]) == ("2020-01-01", "Olympics", "hit")
    assert [(r["title"], r["revid"]) for r in search["results"]] == [("2024 Summer Olympics", 3001)]
    assert set(search["results"][0]) == {"title", "revid", "timestamp", "snippet"}
    assert again["cache"] == "hit" and again["results"] == search["results"]
    assert news["as_of"] == "2024-06-30" and 1 <= len(news["results"]) <= 3
    for item in news["results"]:
        assert set(item) == {"date", "title", "summary", "source", "url"} and item["date"] <= "2024-06-30"
    assert empty["results"] == []


def test_news_without_a_corpus_is_a_bad_request(fake, tmp_path):
    running = serve_in_thread(tools_config(fake, tmp_path / "c.sqlite"))
    try:
        (err,) = call(running.url, lambda c: c.news("x", D(2024, 1, 1)))
    finally:
        running.stop()
    assert err.code == "bad_request" and err.message == "no news corpus configured (tools.news.corpus)"


def test_health_and_metrics(service, fake):
    call(service.url, lambda c: c.revision("Bitcoin", D(2018, 1, 1)), lambda c: c.revision("Bitcoin", D(2018, 1, 1)),
         lambda c: c.revision("Nowhere", D(2018, 1, 1)))
    fake.inject("status", status=503)
    call(service.url, lambda c: c.revision("Paris", D(2018, 1, 1)))
    fake.lie = 1.0
    call(service.url, lambda c: c.revision("Bitcoin", D(2019, 1, 1)))
    (health,) = call(service.url, lambda c: c.health())
    assert health == {"status": "ok", "offline": False, "revisions": 2, "news_items": 600}
    m = metrics(service.url)
    p = "forecast_tools_"
    assert m[(p + "requests_total", (("endpoint", "revision"), ("status", "ok")))] == 3
    assert m[(p + "requests_total", (("endpoint", "revision"), ("status", "missing")))] == 1
    assert m[(p + "requests_total", (("endpoint", "revision"), ("status", "leak")))] == 1
    assert m[(p + "cache_hits_total", ())] == 1 and m[(p + "cache_misses_total", ())] == 4
    assert m[(p + "upstream_requests_total", ())] == 5
    assert m[(p + "upstream_errors_total", (("kind", "http_503"),))] == 1
    assert m[(p + "leaks_refused_total", ())] == 1
    assert m[(p + "request_seconds_count", (("endpoint", "revision"),))] == 5


def test_two_services_in_one_process_keep_their_own_metrics(fake, tmp_path):
    a = serve_in_thread(tools_config(fake, tmp_path / "a.sqlite"))
    b = serve_in_thread(tools_config(fake, tmp_path / "b.sqlite"))
    try:
        call(a.url, lambda c: c.revision("Paris", D(2020, 1, 1)))
        key = ("forecast_tools_requests_total", (("endpoint", "revision"), ("status", "ok")))
        assert metrics(a.url)[key] == 1 and key not in metrics(b.url)
    finally:
        a.stop()
        b.stop()


def test_a_snapshot_served_offline(fake, tmp_path):
    online = serve_in_thread(tools_config(fake, tmp_path / "online.sqlite"))
    try:
        call(online.url, lambda c: c.revision("Twitter CEO", D(2023, 7, 1)),
             lambda c: c.revision("Bitcoin", D(2018, 1, 1)))  # what search finds offline: the pages fetched
    finally:
        online.stop()
    from tools.cache import WikiCache

    WikiCache(tmp_path / "online.sqlite").export_snapshot(tmp_path / "snap.parquet")
    n = len(fake.requests)
    offline = serve_in_thread(tools_config(fake, tmp_path / "node.sqlite", offline=True,
                                           snapshot=str(tmp_path / "snap.parquet")))
    try:
        page, search, miss, health = call(offline.url, lambda c: c.revision("Twitter CEO", D(2023, 7, 1)),
                                          lambda c: c.search("price", D(2018, 1, 1)),
                                          lambda c: c.revision("Paris", D(2020, 1, 1)), lambda c: c.health())
    finally:
        offline.stop()
    assert (page["title"], page["cache"], page["redirected_from"]) == ("Linda Yaccarino", "hit", ["Twitter CEO"])
    assert search["cache"] == "hit" and search["results"][0]["title"] == "Bitcoin"
    assert miss.code == "offline_miss"
    assert health["offline"] is True and health["revisions"] >= 2
    assert len(fake.requests) == n


# ------------------------------------------------------------------------------------- a service that misbehaves


class _Raw(socketserver.BaseRequestHandler):
    """Answers every request with the bytes in `server.reply`, then hangs up."""

    def handle(self):
        self.request.recv(65536)
        self.request.sendall(self.server.reply)


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"title\": \"Par",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 13\r\n\r\n<html></html>",
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 2\r\n\r\n{}",
])
def test_a_garbled_answer_is_unavailable(reply):
    server = socketserver.TCPServer(("127.0.0.1", 0), _Raw)
    server.reply = reply
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (err,) = call(f"http://127.0.0.1:{server.server_address[1]}", lambda c: c.revision("Paris", D(2020, 1, 1)))
    finally:
        server.shutdown()
        server.server_close()
    assert err.code == "unavailable"


def test_a_dead_or_slow_service_is_unavailable_never_a_hang():
    from learner.learner import free_port

    (dead,) = call(f"http://127.0.0.1:{free_port()}", lambda c: c.health())
    assert dead.code == "unavailable" and "ConnectError" in dead.message
    slow_app = FastAPI()

    @slow_app.get("/revision")
    async def revision():
        await asyncio.sleep(5)

    slow = run_app_in_thread(slow_app)
    try:
        t0 = time.monotonic()
        (err,) = call(slow.url, lambda c: c.revision("Paris", D(2020, 1, 1)), timeout_s=0.3)
        assert err.code == "unavailable" and "within 0.3 s" in err.message
        assert time.monotonic() - t0 < 2
    finally:
        slow.stop(timeout_s=0.1)


def test_tools_is_a_leaf():
    imported = set()
    for path in (ROOT / "tools").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
    assert not imported & {"rollout", "learner", "cluster"}


def _serve_process(fake, cache) -> tuple[subprocess.Popen, str]:
    """`forecast-grpo wiki serve` in a process of its own (the service a job restarts: the same class, the same cache
    file), and its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "wiki", "serve", "--port", "0", "--endpoint",
                             fake.url, "--cache", str(cache)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = proc.stdout.readline()
    assert line.startswith("serving on http://"), line + proc.stderr.read()
    return proc, line.split()[2]


def test_a_killed_service_fails_its_waiting_calls_and_restarts_on_the_cache_it_had(fake, tmp_path):
    """SIGKILL, as when a job's service actor dies: a call waiting on it is answered at once with a tool error (not
    after the client's timeout), and a service started again on the same cache file answers a page fetched before
    the kill from that cache, asking the upstream nothing."""
    from rollout import tool_calls
    from rollout.multiturn import ToolRunner

    cache = tmp_path / "cache.sqlite"
    proc, url = _serve_process(fake, cache)
    runner = ToolRunner(url, timeout_s=30)
    try:
        (before,) = call(url, lambda c: c.revision("Bitcoin", D(2018, 1, 1)))
        assert before["cache"] == "miss" and len(fake.requests) > 0  # fetched from the upstream
        fake.inject("sleep", seconds=4)  # the next upstream request hangs: a call waits on the service
        task = runner.submit([tool_calls.Call("wiki", {"title": "Paris"})], D(2020, 1, 1), ["wiki"])
        deadline = time.monotonic() + 10
        while fake.in_flight == 0:
            assert time.monotonic() < deadline, "the call never reached the service's upstream"
            runner.wait([task], timeout=0.05)
        proc.kill()
        proc.wait(timeout=10)
        t0 = time.monotonic()
        runner.wait([task], timeout=20)
        assert task.done() and time.monotonic() - t0 < 5
        (result,) = task.result()
        assert result.error == "unavailable" and result.content.startswith("error (unavailable)")
    finally:
        runner.close()
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
    asked = len(fake.requests)
    proc, url = _serve_process(fake, cache)
    try:
        (after,) = call(url, lambda c: c.revision("Bitcoin", D(2018, 1, 1)))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    assert after == {**before, "cache": "hit"} and len(fake.requests) == asked
