"""The tools as the model sees them: schemas, parsing and validating calls, running them against the real service
(the tool world's snapshot behind it), and the rollout's own leak audit against a lying service."""

import asyncio
import datetime as dt
import json

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


@pytest.mark.parametrize("text,kind", [
    ('<tool_call>{"name": "wiki", "arguments": {"title": "Kato"</tool_call>', "invalid_json"),
    ('<tool_call>["wiki"]</tool_call>', "invalid_json"),
    ('<tool_call>{"name": "wiki", "arguments": {"title": "Kato"}}', "invalid_json"),  # never closed
    ('<tool_call>{"name": "browse", "arguments": {"url": "http://x"}}</tool_call>', "unknown_tool"),
    ('<tool_call>{"name": "wiki", "arguments": {"title": 7}}</tool_call>', "bad_arguments"),
    ('<tool_call>{"name": "wiki", "arguments": {"page": "Kato"}}</tool_call>', "bad_arguments"),
    ('<tool_call>{"name": "wiki", "arguments": {"title": "  "}}</tool_call>', "bad_arguments"),
    ('<tool_call>{"name": "wiki", "arguments": "Kato"}</tool_call>', "bad_arguments"),
    ('<tool_call>{"name": "wiki", "arguments": {"title": "Ka\\u0007to"}}</tool_call>', "bad_title"),
    ('<tool_call>{"name": "wiki", "arguments": {"title": "' + "x" * 600 + '"}}</tool_call>', "too_long"),
])
def test_bad_calls_become_errors_by_kind(text, kind):
    (call,) = tool_calls.parse_calls(text, KINDS)
    assert isinstance(call, tool_calls.BadCall) and call.kind == kind, call


def test_good_calls_and_a_date_argument_dropped_with_a_note():
    calls = tool_calls.parse_calls('<tool_call>\n{"name": "wiki", "arguments": {"title": "Kato"}}\n</tool_call>'
                                   '<tool_call>{"name": "news", "arguments": {"query": "Kato", "as_of": "2030-01-01"}}'
                                   '</tool_call>', KINDS)
    assert [(c.name, c.args) for c in calls] == [("wiki", {"title": "Kato"}), ("news", {"query": "Kato"})]
    assert not calls[0].note and "as_of" in calls[1].note and "ignored" in calls[1].note
    assert tool_calls.parse_calls("<answer>0.4</answer>", KINDS) == []
    # a tool the task does not give is unknown, even if another task has it
    assert tool_calls.parse_calls('<tool_call>{"name": "news", "arguments": {"query": "x"}}</tool_call>',
                                  ["wiki"])[0].kind == "unknown_tool"


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


def _run(url, call_text, as_of, kinds=KINDS):
    async def go():
        client = ToolClient(url, timeout_s=10)
        try:
            return [await tool_calls.run_call(c, client, as_of, kinds)
                    for c in tool_calls.parse_calls(call_text, kinds)]
        finally:
            await client.aclose()
    return asyncio.run(go())


def test_run_call_shows_the_rule_in_force_on_the_date(world_service):
    player = tool_world.players()["train"][0]
    later = player.rules[1]
    day = later.since - dt.timedelta(days=1)  # the day before the second rule
    (r,) = _run(world_service, json.dumps({"name": "wiki", "arguments": {"title": player.name}}).join(
        ["<tool_call>", "</tool_call>"]), day)
    assert r.error is None and not r.leak_violation, r.content
    assert player.rules[0].sentence() in r.content and later.sentence() not in r.content
    assert r.shown == [f"{player.rules[0].since.isoformat()}T09:00:00Z"]
    (n,) = _run(world_service, '<tool_call>{"name": "news", "arguments": {"query": "' + player.name +
                ' rules"}}</tool_call>', day)
    assert n.error is None and player.name in n.content
    assert all(dt.date.fromisoformat(t[:10]) <= day for t in n.shown)


def test_service_errors_reach_the_model_as_messages(world_service):
    (r,) = _run(world_service, '<tool_call>{"name": "wiki", "arguments": {"title": "Nobody Here"}}</tool_call>',
                dt.date(2025, 1, 1))
    assert r.error == "offline_miss" and r.content.startswith("error (offline_miss)")
    app = FastAPI()

    @app.get("/revision")
    def revision(title: str, as_of: str):
        code = "not_yet" if title == "ChatGPT" else "missing"
        return JSONResponse({"error": {"code": code, "message": f"{title!r}: the service's own words"}}, 404)

    running = run_app_in_thread(app)
    try:
        later, never = (_run(running.url, '<tool_call>{"name": "wiki", "arguments": {"title": "' + t + '"}}'
                             '</tool_call>', dt.date(2020, 1, 1))[0] for t in ("ChatGPT", "Nobody"))
    finally:
        running.stop()
    # counted as what they are, but a page created after the date reads as one that never was: no future in it
    assert (later.error, never.error) == ("not_yet", "missing")
    assert later.content.replace("ChatGPT", "Nobody") == never.content == \
        "error (missing): there is no page 'Nobody' as of 2020-01-01"
    (u,) = _run("http://127.0.0.1:9", '<tool_call>{"name": "wiki", "arguments": {"title": "Kato"}}</tool_call>',
                dt.date(2025, 1, 1))
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
        call = '<tool_call>{"name": "wiki", "arguments": {"title": "Kato"}}</tool_call>'
        results = [_run(running.url, call, dt.date(2025, 1, 1))[0] for _ in range(3)]
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
        assert all(r.content == shared[0].content and r.cache_hit for r in shared)  # no upstream request for them
        kato, ito = ask(["Kato", "Ito"])
        assert kato.content == shared[0].content and ito.cache_hit is False and "about Ito" in ito.content
        ask(["Kato"], day + dt.timedelta(days=1))  # another date is another call
        assert asked == ["Kato", "Ito", "Kato"]
        assert ask(["Flaky"])[0].error == "upstream" and ask(["Flaky"])[0].error is None  # asked again
        runner.new_batch()
        ask(["Ito"])
        assert asked == ["Kato", "Ito", "Kato", "Flaky", "Flaky", "Ito"]
    finally:
        runner.close()
        running.stop()
