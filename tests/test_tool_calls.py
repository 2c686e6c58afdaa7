"""The tools as the model sees them: schemas, running calls against the real service (the tool world's snapshot
behind it), and the rollout's own leak audit against a lying service. Parsing and validating calls, in every
model family's format: tests/test_chat_format.py."""

import asyncio
import datetime as dt

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from rollout import tool_calls, tool_world
from tools.client import ToolClient
from tools.config import ToolsConfig
from tools.service import run_app_in_thread, serve_in_thread

KINDS = ["wiki", "wiki_search", "news"]


def test_schemas_have_no_date_argument_and_name_every_function():
    sch = tool_calls.schemas(KINDS)
    assert [s["function"]["name"] for s in sch] == ["wiki", "wiki_search", "news"]
    for s in sch:
        props = s["function"]["parameters"]["properties"]
        assert props and not set(props) & set(tool_calls.DATE_ARGUMENTS)
        assert s["function"]["description"]


@pytest.fixture(scope="module")
def world_service(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    cfg = ToolsConfig.model_validate({
        "wiki": {"snapshot": str(tool_world.write_snapshot(d / "wiki.parquet")), "cache": str(d / "cache.sqlite"),
                 "offline": True},
        "news": {"corpus": str(tool_world.write_news(d / "news.parquet")), "window_days": 400}})
    running = serve_in_thread(cfg)
    yield running.url
    running.stop()


def _run(url, call: tool_calls.Call, as_of, kinds=KINDS) -> tool_calls.Result:
    async def go():
        client = ToolClient(url, timeout_s=10)
        try:
            return await tool_calls.run_call(call, client, as_of, kinds)
        finally:
            await client.aclose()
    return asyncio.run(go())


def wiki(title: str) -> tool_calls.Call:
    return tool_calls.Call("wiki", {"title": title})


def test_run_call_shows_the_rule_in_force_on_the_date(world_service):
    player = tool_world.players()["train"][0]
    later = player.rules[1]
    day = later.since - dt.timedelta(days=1)  # the day before the second rule
    r = _run(world_service, wiki(player.name), day)
    assert r.error is None and not r.leak_violation, r.content
    assert player.rules[0].sentence() in r.content and later.sentence() not in r.content
    assert r.shown == [f"{player.rules[0].since.isoformat()}T09:00:00Z"]
    n = _run(world_service, tool_calls.Call("news", {"query": f"{player.name} rules"}), day)
    assert n.error is None and player.name in n.content
    assert all(dt.date.fromisoformat(t[:10]) <= day for t in n.shown)


def test_service_errors_reach_the_model_as_messages(world_service):
    r = _run(world_service, wiki("Nobody Here"), dt.date(2025, 1, 1))
    assert r.error == "offline_miss" and r.content.startswith("error (offline_miss)")
    app = FastAPI()

    @app.get("/revision")
    def revision(title: str, as_of: str):
        code = "not_yet" if title == "ChatGPT" else "missing"
        return JSONResponse({"error": {"code": code, "message": f"{title!r}: the service's own words"}}, 404)

    running = run_app_in_thread(app)
    try:
        later, never = (_run(running.url, wiki(t), dt.date(2020, 1, 1)) for t in ("ChatGPT", "Nobody"))
    finally:
        running.stop()
    # counted as what they are, but a page created after the date reads as one that never was: no future in it
    assert (later.error, never.error) == ("not_yet", "missing")
    assert later.content.replace("ChatGPT", "Nobody") == never.content == \
        "error (missing): there is no page 'Nobody' as of 2020-01-01"
    u = _run("http://127.0.0.1:9", wiki("Kato"), dt.date(2025, 1, 1))
    assert u.error == "unavailable"


def test_the_audit_withholds_what_a_lying_service_shows_from_later():
    """The service is ours, but the audit trusts no one: a later timestamp, or one that does not parse, is a leak
    violation and its content never reaches the conversation."""
    app = FastAPI()
    answers = iter([{"title": "Kato", "timestamp": "2025-01-02T00:00:00Z", "text": "FUTURE FACT", "cache": "hit"},
                    {"title": "Kato", "timestamp": "next week", "text": "FUTURE FACT", "cache": "hit"},
                    {"title": "Kato", "timestamp": "2025-01-01T23:59:59Z", "text": "today's fact", "cache": "hit"}])

    @app.get("/revision")
    def revision(title: str, as_of: str):
        return next(answers)

    running = run_app_in_thread(app)
    try:
        results = [_run(running.url, wiki("Kato"), dt.date(2025, 1, 1)) for _ in range(3)]
    finally:
        running.stop()
    assert [r.leak_violation for r in results] == [True, True, False]
    assert all("FUTURE" not in r.content for r in results)
    assert results[2].error is None and "today's fact" in results[2].content


def test_a_batch_asks_the_service_once_per_distinct_call_and_again_after_a_transient_error():
    from rollout.multiturn import ToolRunner

    asked = []
    app = FastAPI()

    @app.get("/revision")
    def revision(title: str, as_of: str):
        asked.append(title)
        if title == "Flaky" and asked.count("Flaky") == 1:
            return {"error": {"code": "upstream", "message": "try again"}}
        return {"title": title, "revid": 1, "timestamp": "2020-01-01T00:00:00Z", "text": f"about {title}",
                "cache": "miss"}

    running = run_app_in_thread(app)
    runner = ToolRunner(running.url, timeout_s=10)
    day = dt.date(2021, 1, 1)

    def ask(titles, as_of=day):
        calls = [tool_calls.Call("wiki", {"title": t}) for t in titles]
        task = runner.submit(calls, as_of, ["wiki"])
        runner.wait([task], timeout=30, every=True)
        return task.result()

    try:
        runner.new_batch()
        tasks = [runner.submit([tool_calls.Call("wiki", {"title": "Kato"})], day, ["wiki"]) for _ in range(8)]
        runner.wait(tasks, timeout=0)  # the first asker's request is out...
        tasks[0].cancel()  # ...when its conversation passes its deadline: the others still get the answer
        runner.wait(tasks[1:], timeout=30, every=True)
        shared = [t.result()[0] for t in tasks[1:]]
        assert asked == ["Kato"] and "about Kato" in shared[0].content
        # shared, not cache hits: no request to the service for them (whose one answer was a miss)
        assert all(r.content == shared[0].content and r.shared and r.cache_hit is False for r in shared)
        kato, ito = ask(["Kato", "Ito"])
        assert kato.content == shared[0].content and kato.shared
        assert not ito.shared and ito.cache_hit is False and "about Ito" in ito.content
        ask(["Kato"], day + dt.timedelta(days=1))  # another date is another call
        assert asked == ["Kato", "Ito", "Kato"]
        assert ask(["Flaky"])[0].error == "upstream" and ask(["Flaky"])[0].error is None  # asked again
        runner.new_batch()
        ask(["Ito"])
        assert asked == ["Kato", "Ito", "Kato", "Flaky", "Flaky", "Ito"]
    finally:
        runner.close()
        running.stop()
