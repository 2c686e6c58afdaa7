"""An adversarial run through the rollout's own tool path: 10,000 calls written as a model writes them (some with
dates of their own, many far in the future), parsed, run by the rollout worker's `ToolRunner` against the real
service, whose upstream lies on a quarter of its answers, over redirects whose targets change, pages created after
the as-of date and searches for later events. Nothing later than a question's date may reach a conversation.
The service refuses those lies itself, so the rollout's own audit never acts there: a second run blinds the service,
and the audit must withhold every lie it serves."""

import collections
import datetime as dt
import json
import random

from rollout.chat_format import ChatFormat
from rollout.multiturn import ToolRunner
from tests.fake_mediawiki import FakeMediaWiki
from tests.test_tools_adversarial import FUTURE, MARK, day, generate_world
from tools.config import ToolsConfig
from tools.service import serve_in_thread

KINDS = ["wiki", "wiki_search"]


def model_call(rng: random.Random, titles: list[str], queries: list[str]) -> str:
    if rng.random() < 0.25:
        args, name = {"query": rng.choice(queries)}, "wiki_search"
    else:
        args, name = {"title": rng.choice(titles)}, "wiki"
    if rng.random() < 0.3:  # a model that asks for another date: the question's date is used anyway
        args[rng.choice(["as_of", "date", "year"])] = rng.choice([str(FUTURE), "2026-01-01", "today"])
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': args})}\n</tool_call>"


def test_ten_thousand_model_calls_let_nothing_later_into_a_conversation(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    fmt = ChatFormat(AutoTokenizer.from_pretrained(tiny_model), KINDS)  # Qwen2.5's call layout: vLLM's hermes parser
    world = generate_world(seed=3)
    rng = random.Random(4)
    titles = [*world, "Nowhere"]
    queries = [f"keyword{k}" for k in range(6)] + [f"report{y}" for y in range(2015, 2027)]
    dates = [day(rng, 2012, 2025) for _ in range(24)]
    results, shown_later, kinds = 0, [], {}
    with FakeMediaWiki({"pages": world}) as fake:
        fake.lie = 0.25
        cfg = ToolsConfig(wiki=fake.config(tmp_path / "cache.sqlite", retries=0))
        service = serve_in_thread(cfg)
        runner = ToolRunner(service.url, timeout_s=30)
        try:
            for _ in range(100):  # 100 rollout batches of 100 calls, all in flight at once
                batch = [(rng.choice(dates), model_call(rng, titles, queries)) for _ in range(100)]
                runner.new_batch()  # as a rollout batch does: repeated calls share an answer within it only
                tasks = [(as_of, runner.submit(fmt.parse_calls(text), as_of, KINDS))
                         for as_of, text in batch]
                runner.wait([t for _, t in tasks], timeout=120, every=True)
                for as_of, task in tasks:
                    for r in task.result():
                        results += 1
                        kinds[r.error or "ok"] = kinds.get(r.error or "ok", 0) + 1
                        later = [t for t in r.shown if t > f"{as_of}T23:59:59Z"]
                        later += [m for m in MARK.findall(r.content) if m > str(as_of)]
                        if later or r.leak_violation:
                            shown_later.append((as_of, later, r.content[:80]))
        finally:
            runner.close()
            service.stop()
    assert results == 10_000
    assert shown_later == []
    # not a vacuous run: pages were shown, lies were caught upstream, and the other answers happened too
    assert kinds["ok"] > 2_000 and kinds.get("leak", 0) > 100, kinds
    assert {"missing", "not_yet"} <= set(kinds), kinds


def test_a_service_that_lets_lies_through_is_caught_by_the_rollouts_own_audit(tmp_path, tiny_model, monkeypatch):
    """The same calls against a service made to lie: its own checks blinded (nothing is ever later, for the client
    and for the cache), so the upstream's later revisions pass through it, are cached and served again as hits,
    and searches rank them. Every answer it serves that shows anything after its date must be withheld by the
    rollout's audit, counted as a leak violation, one for one; and nothing later reach a conversation."""
    from transformers import AutoTokenizer

    import tools.cache
    import tools.wiki
    from tools.asof import is_after
    from tools.service import WikiRevisionService

    def later(timestamps, as_of: str) -> bool:  # the real rule, unreadable counting as later (as the audit does)
        return any(not isinstance(t, str) or len(t) != 20 or is_after(t, dt.date.fromisoformat(as_of))
                   for t in timestamps)

    served = []  # per answer the service sent: (endpoint, whether it showed anything later than its date, cache)
    real = {name: getattr(WikiRevisionService, name) for name in ("revision", "search")}

    async def revision(self, p):
        body = await real["revision"](self, p)
        served.append(("revision", later([body["timestamp"]], p["as_of"]), body["cache"]))
        return body

    async def search(self, p):
        body = await real["search"](self, p)
        served.append(("search", later([h["timestamp"] for h in body["results"]], p["as_of"]), body["cache"]))
        return body

    blind = lambda timestamp, as_of: False  # noqa: E731
    monkeypatch.setattr(tools.wiki, "is_after", blind)
    monkeypatch.setattr(tools.cache, "is_after", blind)
    monkeypatch.setattr(WikiRevisionService, "revision", revision)
    monkeypatch.setattr(WikiRevisionService, "search", search)

    fmt = ChatFormat(AutoTokenizer.from_pretrained(tiny_model), KINDS)
    world = generate_world(seed=5)
    rng = random.Random(6)
    titles = [*world, "Nowhere"]
    queries = [f"Topic {k}" for k in range(0, 60, 3)]  # words every revision of the page has: lies match too
    dates = [day(rng, 2012, 2025) for _ in range(12)]
    violations, shown_later, kinds = 0, [], {}
    with FakeMediaWiki({"pages": world}) as fake:
        fake.lie = 0.5
        service = serve_in_thread(ToolsConfig(wiki=fake.config(tmp_path / "cache.sqlite", retries=0)))
        runner = ToolRunner(service.url, timeout_s=30)
        try:
            for _ in range(5):  # 5 batches of 100 calls in flight at once
                tasks = []
                for _ in range(100):
                    as_of = rng.choice(dates)
                    runner.new_batch()  # nothing shared: each call is one answer of the service's
                    tasks.append((as_of, runner.submit(fmt.parse_calls(model_call(rng, titles, queries)), as_of,
                                                       KINDS)))
                runner.wait([t for _, t in tasks], timeout=120, every=True)
                for as_of, task in tasks:
                    for r in task.result():
                        kinds[r.error or "ok"] = kinds.get(r.error or "ok", 0) + 1
                        violations += r.leak_violation
                        bad = [t for t in r.shown if t > f"{as_of}T23:59:59Z"]
                        bad += [m for m in MARK.findall(r.content) if m > str(as_of)]
                        if bad:
                            shown_later.append((as_of, bad, r.content[:80]))
        finally:
            runner.close()
            service.stop()
    assert shown_later == []
    lies = collections.Counter((endpoint, cache) for endpoint, lied, cache in served if lied)
    # the service did lie, often, in every way (about 240 of 400 answers): fresh from the upstream (miss), again from
    # its cache (hit), in search results
    assert lies["revision", "miss"] > 20 and lies["revision", "hit"] > 5, lies
    assert lies["search", "hit"] + lies["search", "miss"] > 10, lies
    assert violations == lies.total() == kinds["leak"], (lies, kinds)
    assert kinds["ok"] > 80, kinds  # and answered honestly otherwise
