"""An adversarial run: 10,000 tool calls against a generated wiki whose upstream lies on a quarter of its revision
answers, over future dates, redirects whose targets change, pages created after the as-of date and searches for
later events. Not one answer may show anything later than its date, and every honest answer must be the one an
independent oracle over the same page histories gives."""

import asyncio
import collections
import datetime as dt
import random
import re
import sqlite3

import pytest

from tests.fake_mediawiki import FakeMediaWiki
from tests.test_tools_news import synthetic_corpus
from tools.cache import WikiCache
from tools.client import ToolClient
from tools.config import NewsConfig, ToolsConfig
from tools.errors import ToolError
from tools.news import NewsIndex, write_corpus
from tools.service import serve_in_thread
from tools.wiki import WikiRevisionClient
from tools.wikitext import TextBudget

MARK = re.compile(r"as of (\d{4}-\d\d-\d\d)")
FUTURE = dt.date.today() + dt.timedelta(days=500)
WHOLE_PAGE = TextBudget(10_000)


def day(rng, first: int, last: int) -> dt.date:
    return dt.date(first, 1, 1) + dt.timedelta(days=rng.randrange((dt.date(last, 12, 31) - dt.date(first, 1, 1)).days))


def generate_world(seed: int = 0) -> dict[str, list[dict]]:
    """Topics (created 2010-2024), pages created in 2025, aliases redirecting to different topics over time (some
    to topics that did not exist yet, some articles then and redirects today), double redirects and a loop. Every
    article revision names its date and the year of the event it reports."""
    rng = random.Random(seed)
    world: dict[str, list[tuple[dt.date, str]]] = {}

    def article(title, d):
        return f"'''{title}''' (as of {d}). keyword{rng.randrange(6)} report{d.year}. {{{{Infobox|x}}}}"

    for i in range(60):
        created = day(rng, 2010, 2024)
        days = sorted({created, *(day(rng, created.year, 2025) for _ in range(rng.randrange(2, 6)))})
        world[f"Topic {i}"] = [(d, article(f"Topic {i}", d)) for d in days if d >= created]
    for i in range(12):
        d = day(rng, 2025, 2025)
        world[f"Late {i}"] = [(d, article(f"Late {i}", d))]
    topics = [t for t in world if t.startswith("Topic")]
    for i in range(12):
        days = sorted({day(rng, 2010, 2025) for _ in range(rng.randrange(1, 5))})
        world[f"Alias {i}"] = [(d, article(f"Alias {i}", d) if rng.random() < 0.3 else
                                f"#REDIRECT [[{rng.choice(topics)}]]") for d in days]
    for i in range(4):
        world[f"Double {i}"] = [(dt.date(2012, 1, 1), f"#REDIRECT [[Alias {i}]]")]
    world["Loop X"] = [(dt.date(2015, 1, 1), "#REDIRECT [[Loop Y]]")]
    world["Loop Y"] = [(dt.date(2015, 1, 1), "#REDIRECT [[Loop X]]")]
    revid = iter(range(1, 10**6))
    return {title: [{"revid": next(revid), "timestamp": f"{d}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00Z",
                     "content": content} for d, content in revs] for title, revs in world.items()}


class Oracle:
    """What each (title, date) should show, worked out directly from the page histories."""

    def __init__(self, world):
        self.world = world
        self.by_revid = {r["revid"]: (t, r) for t, revs in world.items() for r in revs}

    def as_of(self, title, d):
        end, chain, t = f"{d}T23:59:59Z", [], title
        while True:
            revs = sorted((r for r in self.world.get(t, []) if r["timestamp"] <= end), key=lambda r: r["timestamp"])
            if t not in self.world:
                return "missing", None, chain
            if not revs:
                return "not_yet", None, chain
            m = re.match(r"#REDIRECT \[\[(.+)\]\]", revs[-1]["content"])
            if not m:
                return "ok", revs[-1]["revid"], chain
            chain.append(t)
            if m.group(1) in chain or len(chain) > 3:
                return "invalid_title", None, chain
            t = m.group(1)

    def created(self, title):
        return min(r["timestamp"] for r in self.world[title])


class Checker:
    """Checks every answer against the oracle; `later` collects anything shown that is later than its date."""

    def __init__(self, oracle):
        self.oracle, self.calls, self.later = oracle, 0, []
        self.seen = collections.Counter()
        """Answers by kind (ok, redirected, each error code, search results), so a vacuous run fails too."""

    def shown(self, what, as_of, timestamp, text):
        if timestamp > f"{as_of}T23:59:59Z" or any(m > str(as_of) for m in MARK.findall(text)):
            self.later.append((what, str(as_of), timestamp, text[:80]))

    def revision(self, title, as_of, answer):
        self.calls += 1
        status, revid, chain = self.oracle.as_of(title, as_of)
        if isinstance(answer, ToolError):
            assert answer.code in ("leak", status), (title, as_of, answer, status)
            self.seen[answer.code] += 1
            return
        self.seen["redirected" if answer["redirected_from"] else "ok"] += 1
        self.shown(title, as_of, answer["timestamp"], answer["text"])
        assert (status, answer["revid"], answer["redirected_from"]) == ("ok", revid, chain), (title, as_of)

    def search(self, query, as_of, answer):
        self.calls += 1
        if isinstance(answer, ToolError):
            assert answer.code == "leak", answer
            self.seen["leak"] += 1
            return
        self.seen["search results"] += len(answer["results"])
        for r in answer["results"]:
            self.shown(f"search {query}", as_of, r["timestamp"], r["snippet"])
            assert self.oracle.created(r["title"]) <= f"{as_of}T23:59:59Z", (query, as_of, r)
            assert self.oracle.as_of(r["title"], as_of)[1] == r["revid"], (query, as_of, r)
            assert query.lower() in self.oracle.by_revid[r["revid"]][1]["content"].lower()

    def news(self, as_of, window_days, results):
        self.calls += 1
        self.seen["news items"] += len(results)
        for item in results:
            self.shown("news", as_of, f"{item['date']}T00:00:00Z", item["summary"].replace("dated", "as of"))
            assert item["date"] >= str(as_of - dt.timedelta(days=window_days - 1))


@pytest.fixture(scope="module")
def world():
    return generate_world()


async def answer(coro):
    try:
        return await coro
    except ToolError as e:
        return e


async def in_batches(calls, size=32):
    """The calls 32 at a time, as the samples of a rollout batch call tools at once."""
    for i in range(0, len(calls), size):
        await asyncio.gather(*calls[i:i + size])


def test_ten_thousand_calls_show_nothing_later(world, tmp_path):
    oracle, rng = Oracle(world), random.Random(1)
    checker = Checker(oracle)
    titles = [*world, "Nowhere", "Also nowhere"]
    dates = [day(rng, 2010, 2025) for _ in range(30)] + [FUTURE]
    queries = [f"keyword{k}" for k in range(6)] + [f"report{y}" for y in range(2012, 2026)]  # and later events
    search_dates = dates[:8] + [FUTURE]
    write_corpus(synthetic_corpus(3000, seed=2), tmp_path / "news.parquet")
    news_cfg = NewsConfig(corpus=str(tmp_path / "news.parquet"), window_days=14, limit=20)

    with FakeMediaWiki({"pages": world}) as fake:
        fake.lie = 0.25
        cfg = fake.config(tmp_path / "cache.sqlite", retries=0)

        async def in_process(n_revisions, n_searches):
            client = WikiRevisionClient(cfg, WikiCache(cfg.cache))

            async def revision(title, as_of):
                got = await answer(client.get(title, as_of))
                checker.revision(title, as_of, got if isinstance(got, ToolError) else got.answer(WHOLE_PAGE))

            async def search(query, as_of):
                got = await answer(client.search(query, as_of))
                checker.search(query, as_of, got if isinstance(got, ToolError) else {"results": got.results})

            calls = [revision(rng.choice(titles), rng.choice(dates)) for _ in range(n_revisions)]
            calls += [search(rng.choice(queries), rng.choice(search_dates)) for _ in range(n_searches)]
            rng.shuffle(calls)
            try:
                await in_batches(calls)
            finally:
                await client.aclose()
            return client.metrics.leaks_refused._value.get()

        async def over_http(url, n_revisions, n_news):
            client = ToolClient(url)

            async def revision(title, as_of):
                checker.revision(title, as_of, await answer(client.revision(title, as_of)))

            async def news(query, as_of):
                checker.news(as_of, news_cfg.window_days, (await client.news(query, as_of))["results"])

            calls = [revision(rng.choice(titles), rng.choice(dates)) for _ in range(n_revisions)]
            calls += [news(rng.choice(["election", "bitcoin storm", "merger"]), day(rng, 2024, 2024))
                      for _ in range(n_news)]
            rng.shuffle(calls)
            try:
                await in_batches(calls)
            finally:
                await client.aclose()

        leaks = asyncio.run(in_process(4500, 1000))
        running = serve_in_thread(ToolsConfig(wiki=cfg, news=news_cfg))
        try:
            asyncio.run(over_http(running.url, 600, 400))
        finally:
            running.stop()
    news = NewsIndex(news_cfg)
    for _ in range(3500):
        as_of = day(rng, 2024, 2024)
        checker.news(as_of, news_cfg.window_days, news.search(rng.choice(["election", "bitcoin", "storm"]), as_of))

    assert checker.calls >= 10_000
    assert checker.later == []
    assert leaks > 100 and checker.seen["leak"] > 100  # the upstream did lie, and was caught
    seen = checker.seen
    assert min(seen["ok"], seen["not_yet"], seen["search results"], seen["news items"]) > 800, seen
    assert min(seen["redirected"], seen["missing"], seen["invalid_title"]) > 50, seen
    # nothing the liar said was kept: every stored answer is the oracle's, and no day not over yet is stored
    conn = sqlite3.connect(tmp_path / "cache.sqlite")
    for title, as_of, status, revid in conn.execute("SELECT title_key, as_of, status, revid FROM lookups"):
        assert oracle.as_of(title, dt.date.fromisoformat(as_of))[:2] == (status, revid), (title, as_of)
    assert conn.execute("SELECT count(*) FROM lookups WHERE as_of = ?", (str(FUTURE),)).fetchone()[0] == 0
