"""WikiRevisionClient against the fake MediaWiki: the right revision for a date, every answer shape, redirects as
they stood then, retries, the concurrency bound, leaks refused, offline mode, and search as of a date."""

import asyncio
import datetime as dt
import time

import pytest

from tests.fake_mediawiki import FIXTURES, FakeMediaWiki
from tests.test_tools_cache import rows
from tools.cache import WikiCache
from tools.errors import ToolError
from tools.wiki import WikiRevisionClient

D = dt.date


@pytest.fixture(scope="module")
def fake():
    with FakeMediaWiki() as wiki:
        yield wiki


@pytest.fixture
def wiki(fake, tmp_path):
    """(fake, cache, make_client): the fake reset, a fresh cache, and clients on it made inside the test's loop."""
    fake.reset()
    cache = WikiCache(tmp_path / "cache.sqlite")
    yield fake, cache, lambda **kw: WikiRevisionClient(fake.config(cache.path, **kw), cache)
    cache.close()


def run(make_client, *calls, **cfg):
    """Make a client, run `calls` (functions of the client returning coroutines) one after another, close it;
    returns each call's result, or the ToolError it raised."""
    async def main():
        client = make_client(**cfg)
        out = []
        try:
            for call in calls:
                try:
                    out.append(await call(client))
                except ToolError as e:
                    out.append(e)
        finally:
            await client.aclose()
        return out
    return asyncio.run(main())


def get(title, as_of):
    return lambda c: c.get(title, as_of)


@pytest.mark.parametrize("title, as_of, revid", [
    ("Bitcoin", D(2009, 1, 10), 1001),
    ("Bitcoin", D(2017, 12, 16), 1001),
    ("Bitcoin", D(2017, 12, 17), 1002),
    ("Bitcoin", D(2021, 11, 9), 1002),
    ("Bitcoin", D(2030, 1, 1), 1004),
    ("End of day", D(2020, 5, 1), 5002),  # stamped 23:59:59Z: still that day
    ("End of day", D(2020, 5, 2), 5003),
])
def test_the_newest_revision_at_or_before_the_end_of_the_day(wiki, title, as_of, revid):
    _, _, make = wiki
    (rev,) = run(make, get(title, as_of))
    assert (rev.revid, rev.title, rev.cache) == (revid, title, "miss")
    assert f"as of {rev.timestamp[:10]}" in rev.text


def test_normalised_titles_share_the_cache(wiki):
    fake, _, make = wiki
    first, second = run(make, get("bitcoin", D(2018, 1, 1)), get("Bitcoin", D(2018, 1, 1)))
    assert (first.title, first.requested_title, first.cache) == ("Bitcoin", "bitcoin", "miss")
    assert (second.revid, second.requested_title, second.cache) == (first.revid, "Bitcoin", "hit")
    assert len(fake.requests) == 1
    assert first.text.startswith("Bitcoin is a decentralised digital currency (as of 2017-12-17).\n\n== Price ==")
    assert "Infobox" not in first.text and "cite news" not in first.text


@pytest.mark.parametrize("title, as_of, shown, via", [
    ("Twitter", D(2016, 1, 1), "Twitter", []),  # a redirect today, an article then
    ("Twitter", D(2024, 1, 1), "X (social network)", ["Twitter"]),
    ("Twitter CEO", D(2016, 1, 1), "Jack Dorsey", ["Twitter CEO"]),  # the target changed over time
    ("Twitter CEO", D(2022, 12, 1), "Elon Musk", ["Twitter CEO"]),
    ("Twitter CEO", D(2023, 7, 1), "Linda Yaccarino", ["Twitter CEO"]),
    ("Twtr", D(2015, 1, 1), "Twitter", ["Twtr"]),
    ("Twtr", D(2024, 1, 1), "X (social network)", ["Twtr", "Twitter"]),  # a double redirect then
    ("Loop A", D(2019, 6, 1), "Loop A", []),
])
def test_redirects_as_they_stood_on_the_date(wiki, title, as_of, shown, via):
    _, _, make = wiki
    (rev,) = run(make, get(title, as_of))
    assert (rev.title, rev.redirected_from) == (shown, via)
    assert rev.timestamp <= f"{as_of}T23:59:59Z"
    (again,) = run(make, get(title, as_of))
    assert (again.cache, again.title, again.revid, again.redirected_from) == ("hit", shown, rev.revid, via)


@pytest.mark.parametrize("title, as_of, code, message", [
    ("Nowhere", D(2020, 1, 1), "missing", "there is no page 'Nowhere'"),
    ("ChatGPT", D(2022, 11, 30), "not_yet", "'ChatGPT' has no revision at or before 2022-11-30"),
    ("Old Elon", D(2007, 1, 1), "not_yet", "'Elon Musk' (redirected from 'Old Elon') has no revision"),
    ("Loop A", D(2021, 1, 1), "invalid_title", "redirects loop as of 2021-01-01: Loop A -> Loop B -> Loop A"),
    ("A|b", D(2021, 1, 1), "invalid_title", 'contains invalid characters: "|"'),
    ("Talk:", D(2021, 1, 1), "invalid_title", "empty or contains only the name of a namespace"),
    ("", D(2021, 1, 1), "bad_request", "title is empty"),
    ("A\x00b", D(2021, 1, 1), "bad_request", "control characters"),
    ("é" * 128, D(2021, 1, 1), "bad_request", "256 bytes"),
])
def test_errors_name_the_page_and_the_date(wiki, title, as_of, code, message):
    fake, cache, make = wiki
    (err,) = run(make, get(title, as_of))
    assert isinstance(err, ToolError) and err.code == code and message in err.message
    if code == "bad_request":
        assert fake.requests == []
    if code in ("missing", "not_yet"):  # valid answers: kept, and answered again from the cache
        n = len(fake.requests)
        (again,) = run(make, get(title, as_of))
        assert (again.code, again.message, len(fake.requests)) == (code, err.message, n)


def test_an_older_wiki_without_slots_or_formatversion_2(tmp_path):
    with FakeMediaWiki(FIXTURES / "legacy_wiki.json") as fake:
        cache = WikiCache(tmp_path / "cache.sqlite")
        make = lambda **kw: WikiRevisionClient(fake.config(cache.path, **kw), cache)
        old, new, redirect, missing = run(make, get("Steam engine", D(2010, 1, 1)), get("Steam engine", D(2013, 1, 1)),
                                          get("Watt engine", D(2013, 1, 1)), get("Nowhere", D(2013, 1, 1)))
    assert "pages" in fake.answer({"action": "query", "prop": "revisions", "titles": "X"})["query"]
    assert (old.revid, new.revid) == (11, 12)
    assert "== History ==\n\nJames Watt improved it." in new.text
    assert (redirect.title, redirect.revid, redirect.redirected_from) == ("Steam engine", 12, ["Watt engine"])
    assert missing.code == "missing"


def test_an_answer_cut_by_the_size_limit_is_continued(wiki):
    fake, _, make = wiki
    fake.inject("cut")
    (rev,) = run(make, get("Paris", D(2020, 1, 1)))
    assert rev.revid == 2001 and len(fake.requests) == 2
    assert fake.requests[1]["params"]["rvcontinue"].endswith("|2001")


@pytest.mark.parametrize("kind, kw, error_kind", [
    ("status", dict(status=500), "http_500"),
    ("status", dict(status=503, retry_after=0.05), "http_503"),
    ("status", dict(status=429, retry_after=0.05), "http_429"),
    ("api_error", dict(code="maxlag", retry_after=0.05), "maxlag"),
    ("api_error", dict(code="ratelimited"), "ratelimited"),
    ("truncate", {}, "bad_json"),
    ("sleep", dict(seconds=1.0), "timeout"),
])
def test_retryable_failures_are_retried(wiki, kind, kw, error_kind):
    fake, cache, make = wiki
    fake.inject(kind, times=2, **kw)
    client = make(timeout_s=0.3)
    (rev,) = run(lambda **_: client, get("Bitcoin", D(2018, 1, 1)))
    assert rev.revid == 1002 and len(fake.requests) == 3
    assert client.metrics.upstream_errors.labels(error_kind)._value.get() == 2
    assert client.metrics.upstream_requests._value.get() == 3


def test_retry_after_is_honoured(wiki):
    fake, _, make = wiki
    fake.inject("status", status=429, retry_after=0.4)
    t0 = time.monotonic()
    (rev,) = run(make, get("Bitcoin", D(2018, 1, 1)), backoff_s=0.0)
    assert rev.revid == 1002 and time.monotonic() - t0 >= 0.4


def test_failures_after_retries_are_a_tool_error_and_change_nothing(wiki):
    fake, cache, make = wiki
    run(make, get("Paris", D(2020, 1, 1)))
    before = rows(cache)
    fake.inject("status", status=500, times=3)
    (err,) = run(make, get("Bitcoin", D(2018, 1, 1)))
    assert err.code == "upstream" and "HTTP 500 (attempt 3 of 3)" in err.message
    fake.inject("api_error", code="maxlag", retry_after=60)  # longer than max_backoff_s: give up at once
    (err,) = run(make, get("Bitcoin", D(2018, 1, 1)))
    assert err.code == "upstream" and "retry after 60 s" in err.message
    fake.inject("api_error", code="badvalue")  # not retryable
    n = len(fake.requests)
    (err,) = run(make, get("Bitcoin", D(2018, 1, 1)))
    assert err.code == "upstream" and "API error badvalue" in err.message and len(fake.requests) == n + 1
    assert rows(cache) == before


def test_a_later_revision_is_refused_counted_and_not_kept(wiki):
    fake, cache, make = wiki
    run(make, get("Paris", D(2020, 1, 1)))
    before = rows(cache)
    fake.lie = 1.0
    client = make(live_search=True)  # the cache's index finds nothing for bitcoin: the upstream's search is asked
    leak, redirected, search = run(lambda **_: client, get("Bitcoin", D(2018, 1, 1)), get("Twitter", D(2016, 1, 1)),
                                   lambda c: c.search("bitcoin", D(2018, 1, 1)))
    assert leak.code == "leak" and "refused" in leak.message
    assert "1004" not in leak.message and "2024" not in leak.message  # the later edit's date is a leak too
    assert redirected.code == "leak"
    assert search.results == []
    assert client.metrics.leaks_refused._value.get() == 3
    assert {k: v for k, v in rows(cache).items() if k != "pages"} == {k: v for k, v in before.items()
                                                                      if k != "pages"}
    fake.lie = 0.0
    (rev,) = run(make, get("Bitcoin", D(2018, 1, 1)))
    assert rev.revid == 1002


def test_at_most_three_requests_in_flight(wiki):
    fake, _, make = wiki
    fake.latency_s = 0.1
    days = [D(2018, 1, 1) + dt.timedelta(days=i) for i in range(12)]

    async def main():
        client = make()
        try:
            return await asyncio.gather(*(client.get("Bitcoin", d) for d in days))
        finally:
            await client.aclose()

    t0 = time.monotonic()
    revs = asyncio.run(main())
    assert [r.revid for r in revs] == [1002] * 12
    assert fake.max_in_flight == 3 and len(fake.requests) == 12
    assert time.monotonic() - t0 >= 0.4  # 12 requests, 3 at a time, 0.1 s each


def test_the_same_question_at_once_is_fetched_once(wiki):
    fake, _, make = wiki
    fake.latency_s = 0.05

    async def main():
        client = make()
        try:
            return await asyncio.gather(*(client.get(t, D(2018, 1, 1)) for t in ["Bitcoin", "bitcoin"] * 8))
        finally:
            await client.aclose()

    revs = asyncio.run(main())
    assert {r.revid for r in revs} == {1002} and len(fake.requests) == 1
    assert [r.requested_title for r in revs[:2]] == ["Bitcoin", "bitcoin"]


def test_etiquette_user_agent_gzip_maxlag(wiki):
    fake, _, make = wiki
    run(make, get("Bitcoin", D(2018, 1, 1)), contact="ops@example.org")
    (req,) = fake.requests
    assert req["user_agent"].startswith("forecast-grpo/0.1 (https://github.com/forecast-grpo/forecast-grpo; "
                                        "ops@example.org) httpx/")
    assert "gzip" in req["accept_encoding"]
    p = req["params"]
    assert (p["maxlag"], p["format"], p["formatversion"], p["rvdir"], p["rvstart"]) == (
        "5", "json", "2", "older", "2018-01-01T23:59:59Z")
    assert (p["rvlimit"], p["rvprop"], p["rvslots"], p["redirects"]) == ("1", "ids|timestamp|content", "main", "1")


def test_a_day_not_over_yet_is_not_kept(wiki):
    fake, cache, make = wiki
    future = dt.date.today() + dt.timedelta(days=400)
    first, second = run(make, get("Bitcoin", future), get("Bitcoin", future))
    assert first.revid == second.revid == 1004 and second.cache == "miss"
    assert rows(cache)["lookups"] == [] and len(rows(cache)["revisions"]) == 1


def test_offline_answers_from_the_cache_only(wiki):
    fake, cache, make = wiki
    run(make, get("Twitter", D(2024, 1, 1)), get("Nowhere", D(2024, 1, 1)))
    n = len(fake.requests)
    hit, missing, miss = run(make, get("twitter", D(2024, 1, 1)), get("Nowhere", D(2024, 1, 1)),
                             get("Twitter", D(2024, 1, 2)), offline=True)
    assert (hit.title, hit.cache, hit.redirected_from) == ("X (social network)", "hit", ["Twitter"])
    assert missing.code == "missing"
    assert miss.code == "offline_miss" and "not in the offline cache" in miss.message
    assert len(fake.requests) == n


def test_live_search_shows_only_pages_that_existed_with_their_text_then(wiki):
    """wiki.live_search: today's search index picks the candidates for a query the cache's index finds nothing for;
    what it shows is still only pages that existed then, as they stood then."""
    fake, _, make = wiki
    olympics, medal, chatbot, chatbot_later, again = run(
        make, lambda c: c.search("Olympics Paris", D(2020, 1, 1)), lambda c: c.search("medal", D(2020, 1, 1)),
        lambda c: c.search("chatbot", D(2022, 6, 1)), lambda c: c.search("chatbot", D(2023, 6, 1)),
        lambda c: c.search("Olympics Paris", D(2020, 1, 1)), live_search=True)
    assert olympics.cache == "miss" and {r["title"] for r in olympics.results} == {"2024 Summer Olympics", "Paris"}
    for r in olympics.results:
        assert r["timestamp"] <= "2020-01-01T23:59:59Z" and "2024-08-12" not in r["snippet"]
    assert medal.results == []  # today's text mentions medals; the text of 2020 did not
    assert chatbot.results == []  # ChatGPT was created on 2022-12-01
    assert not [r for r in fake.requests if r["params"].get("titles") == "ChatGPT"
                and r["params"].get("rvdir") == "older" and r["params"]["rvstart"].startswith("2022-06-01")]
    assert [(r["title"], r["revid"]) for r in chatbot_later.results] == [("ChatGPT", 4002)]
    assert again.cache == "hit" and again.results == olympics.results
    assert all("srsearch" not in r["params"] or r["params"]["srprop"] == "" for r in fake.requests)


def test_offline_search_ranks_the_cached_pages_as_of_the_date(wiki):
    _, _, make = wiki
    run(make, get("Bitcoin", D(2018, 1, 1)), get("Bitcoin", D(2022, 1, 1)), get("Paris", D(2016, 1, 1)))
    early, late, nothing = run(make, lambda c: c.search("price", D(2018, 6, 1)),
                               lambda c: c.search("price", D(2030, 1, 1)), lambda c: c.search("price", D(2010, 1, 1)),
                               offline=True)
    assert [(r["revid"], early.cache) for r in early.results] == [(1002, "hit")]
    assert [r["revid"] for r in late.results] == [1003]  # the newest cached revision, not today's
    assert nothing.results == []


class Prominent(FakeMediaWiki):
    """A wiki whose search ranks by today's text: the pages that mention the query most now come first."""

    def _search(self, p):
        found = super()._search({**p, "srlimit": "50"})["query"]["search"]
        word = p["srsearch"].lower()
        found.sort(key=lambda h: -self.pages[h["title"]][-1]["content"].lower().count(word))
        return {"batchcomplete": True, "query": {"search": found[:int(p.get("srlimit", 10))]}}


def rev(revid, day, content):
    return {"revid": revid, "timestamp": f"{day}T00:00:00Z", "content": content}


# OpenAI mentioned chatbots once in 2016 and is all about one today; ChatGPT did not exist before 2022-11-30
CHATBOTS = {"pages": {
    "ELIZA": [rev(7001, "2010-01-01", "ELIZA is an early chatbot. The chatbot imitates a therapist.")],
    "Cleverbot": [rev(7011, "2012-01-01", "Cleverbot is a chatbot that learns from its conversations.")],
    "OpenAI": [rev(7021, "2016-01-01", "OpenAI is a laboratory for research in artificial intelligence, founded in "
                   "2015. Its researchers publish papers on reinforcement learning, robotics, games and language, "
                   "and one of them is about a chatbot."),
               rev(7022, "2023-02-01", "OpenAI makes ChatGPT, a chatbot. The chatbot is the most used chatbot.")],
    "ChatGPT": [rev(7031, "2022-11-30", "ChatGPT is a chatbot made by OpenAI.")],
}}


@pytest.fixture
def chatbots(tmp_path):
    with Prominent(CHATBOTS) as fake:
        cache = WikiCache(tmp_path / "cache.sqlite")
        yield fake, cache, lambda **kw: WikiRevisionClient(fake.config(cache.path, search_limit=5, **kw), cache)
        cache.close()


def test_search_picks_and_ranks_its_pages_as_of_the_date(chatbots):
    """The pages the cache holds, each as it stood on the date: a page that became prominent later (OpenAI) does not
    push out the ones that mattered then, one created later (ChatGPT) is not there, and today's index is never
    asked."""
    fake, _, make = chatbots
    run(make, *(get(t, D(2020, 1, 1)) for t in ("ELIZA", "Cleverbot", "OpenAI")),
        *(get(t, D(2023, 6, 1)) for t in ("OpenAI", "ChatGPT")))  # the cache holds the later revisions too
    top2, then, later = run(make, lambda c: c.search("chatbot", D(2020, 1, 1), limit=2),
                            lambda c: c.search("chatbot", D(2020, 1, 1)), lambda c: c.search("chatbot", D(2023, 6, 1)))
    assert [r["title"] for r in top2.results] == ["ELIZA", "Cleverbot"] and top2.cache == "hit"
    assert {(r["title"], r["revid"]) for r in then.results} == {("ELIZA", 7001), ("Cleverbot", 7011), ("OpenAI", 7021)}
    assert all("ChatGPT" not in r["snippet"] for r in then.results)
    assert {(r["title"], r["revid"]) for r in later.results} >= {("OpenAI", 7022), ("ChatGPT", 7031)}
    assert not [r for r in fake.requests if r["params"].get("list") == "search"]


def test_live_search_is_an_opt_in_fallback_and_counted(chatbots):
    """Today's index ranks OpenAI first for "chatbot": the fallback, asked for one candidate, shows it as it stood
    in 2020; that choice is what became notable later, so it is off unless asked for, and counted when used."""
    fake, _, make = chatbots
    (default,) = run(make, lambda c: c.search("chatbot", D(2020, 1, 1)))
    assert default.results == [] and not fake.requests  # an empty cache knows no page: nothing is asked upstream

    async def live():
        client = make(live_search=True, search_candidates=1)
        try:
            return await client.search("chatbot", D(2020, 1, 1)), client.metrics.live_searches._value.get()
        finally:
            await client.aclose()

    found, counted = asyncio.run(live())
    assert [(r["title"], r["revid"]) for r in found.results] == [("OpenAI", 7021)] and counted == 1
    assert [r["params"]["srsearch"] for r in fake.requests if r["params"].get("list") == "search"] == ["chatbot"]
