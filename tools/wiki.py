"""WikiRevisionClient: a Wikipedia page as it stood on a date, from the MediaWiki Action API, through the cache.

One request asks for the newest revision at or before the end of the as-of date (`rvdir=older&rvstart=...`).
Redirects are followed as they stood then: today's redirect (`query.redirects`) is not trusted, so the source
title's own revision as of the date is fetched, and if that was a redirect its target is followed as of the date
(at most `MAX_REDIRECT_HOPS`); if it was an article then, that article is the answer.

The client checks every revision's timestamp against the as-of date itself: an upstream (a proxy, a mirror, a bug)
that answers with a later revision is refused (`leak`), counted, and nothing of that fetch is kept or shown.

Etiquette (Wikimedia's API guidelines): a descriptive User-Agent with contact details, gzip, at most
`max_concurrency` (≤ 3) requests in flight, `maxlag`, exponential backoff that honours Retry-After, a timeout on every
request, and only the configured endpoint is ever fetched.

Search is as of the date, candidates and ranking both: an FTS5 index over the cache's revisions, each page's newest
one at or before the date (`WikiCache.rank_as_of`), picks the candidates; each is then shown as it stood on the date
(the page's revision then, fetched if the cache has only an older one; offline, the cached one), ranked by bm25 over
that text, snippets from it. The cache holds the pages `wiki` calls fetched and those of a snapshot: a page that
existed then but was never fetched is not found, and one that only became notable later is found only as it stood
then, ranked by what it said then. Today's search index is never consulted
unless `wiki.live_search` is on, and then only for a query the as-of index finds nothing for (counted): its titles
are candidates only (its snippets are today's text and are never read), pages created after the date are dropped,
and the rest are ranked by bm25 over their text as of the date (a page whose text then does not match the query at
all is dropped). The choice of candidates still reflects what is notable today: that is why it is off by default.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import email.utils
import logging
import random
import re
from typing import NamedTuple

import httpx

from tools.asof import check_timestamp, end_of, is_after, is_over
from tools.cache import Cached, WikiCache, title_key
from tools.config import WikiConfig
from tools.errors import UNDATED, ToolError
from tools.metrics import ToolMetrics
from tools.wikitext import TextBudget, redirect_target

log = logging.getLogger(__name__)

MAX_REDIRECT_HOPS = 3
RETRYABLE_API_ERRORS = {"maxlag", "ratelimited"}
MAX_TITLE_BYTES = 255
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc


@dataclasses.dataclass(frozen=True)
class Revision:
    title: str
    """The page shown: MediaWiki's normalised title, after redirects as they stood on the as-of date."""
    requested_title: str
    revid: int
    timestamp: str
    as_of: dt.date
    text: str
    """The whole page as plain text (`answer` cuts it to the token budget)."""
    redirected_from: list[str]
    cache: str
    """"hit" or "miss"."""

    def answer(self, budget: TextBudget) -> dict:
        text, truncated = budget.cut(self.text)
        return {"title": self.title, "requested_title": self.requested_title, "revid": self.revid,
                "timestamp": self.timestamp, "as_of": self.as_of.isoformat(), "text": text, "truncated": truncated,
                "redirected_from": self.redirected_from, "cache": self.cache}


class Found(NamedTuple):
    results: list[dict]
    """[{title, revid, timestamp, snippet}], best first."""
    cache: str
    """"hit" when no upstream request was needed."""


@dataclasses.dataclass(frozen=True)
class _Page:
    """One page of an API answer: `title` normalised (and redirected, if the request followed redirects)."""
    title: str
    info: dict
    redirect_to: str | None


class _Retry(Exception):
    def __init__(self, kind: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.kind, self.detail, self.retry_after = kind, detail, retry_after


def check_title(title: str) -> None:
    if not title.strip():
        raise ToolError("bad_request", "title is empty")
    if CONTROL_CHARACTERS.search(title):
        raise ToolError("bad_request", f"title {title!r} contains control characters")
    if len(title.encode()) > MAX_TITLE_BYTES:
        raise ToolError("bad_request", f"title is {len(title.encode())} bytes; MediaWiki titles are at most "
                        f"{MAX_TITLE_BYTES}")


def user_agent(cfg: WikiConfig) -> str:
    ua = cfg.user_agent
    if cfg.contact:
        ua = f"{ua[:-1]}; {cfg.contact})" if ua.endswith(")") else f"{ua} ({cfg.contact})"
    return f"{ua} httpx/{httpx.__version__}"


def _retry_after(header: str | None) -> float | None:
    """Retry-After in seconds: a number, or an HTTP date."""
    if header is None:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())


def _content(revision: dict) -> str | None:
    """The wikitext: on the main slot (MediaWiki ≥ 1.32), else on the revision itself (older wikis); `*` is
    formatversion 1's name for it."""
    main = (revision.get("slots") or {}).get("main", revision)
    content = main.get("content", main.get("*"))
    return content if isinstance(content, str) else None


def _status_error(status: str, title: str, as_of: dt.date, chain: list[str]) -> ToolError:
    via = f" (redirected from {' -> '.join(map(repr, chain))})" if chain else ""
    if status == "missing":
        return ToolError("missing", f"there is no page {title!r}{via}")
    return ToolError("not_yet", f"{title!r}{via} has no revision at or before {as_of}: the page did not exist yet")


class WikiRevisionClient:
    def __init__(self, cfg: WikiConfig, cache: WikiCache, metrics: ToolMetrics | None = None):
        self.cfg, self.cache = cfg, cache
        self.metrics = metrics or ToolMetrics()
        self._http = httpx.AsyncClient(
            headers={"User-Agent": user_agent(cfg), "Accept-Encoding": "gzip"}, timeout=cfg.timeout_s,
            limits=httpx.Limits(max_connections=cfg.max_concurrency), follow_redirects=False)
        self._slots = asyncio.Semaphore(cfg.max_concurrency)
        self._inflight: dict[tuple[str, dt.date], asyncio.Future] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---------------------------------------------------------------------------------------------------- upstream

    async def _once(self, params: dict) -> dict:
        async with self._slots:
            self.metrics.upstream_requests.inc()
            try:
                async with asyncio.timeout(self.cfg.timeout_s):  # a hard bound, also on a server that trickles
                    r = await self._http.get(self.cfg.endpoint, params=params)
            except (TimeoutError, httpx.TimeoutException):
                raise _Retry("timeout", f"no answer within {self.cfg.timeout_s:g} s") from None
            except httpx.TransportError as e:
                raise _Retry("transport", f"{type(e).__name__}: {e}") from None
        retry_after = _retry_after(r.headers.get("retry-after"))
        if r.status_code == 429 or r.status_code >= 500:
            raise _Retry(f"http_{r.status_code}", f"HTTP {r.status_code}", retry_after)
        if r.status_code != 200:
            self.metrics.upstream_errors.labels(f"http_{r.status_code}").inc()
            where = f" to {r.headers['location']}" if r.is_redirect and "location" in r.headers else ""
            raise ToolError("upstream", f"HTTP {r.status_code}{where} from {self.cfg.endpoint} (wiki.endpoint)")
        try:
            body = r.json()
        except ValueError:
            raise _Retry("bad_json", "the answer is not JSON (truncated?)") from None
        if not isinstance(body, dict):
            raise _Retry("bad_json", "the answer is not a JSON object")
        error = body.get("error")
        if error:
            code, info = (error.get("code"), error.get("info", "")) if isinstance(error, dict) else (error, "")
            if code in RETRYABLE_API_ERRORS:
                raise _Retry(str(code), f"API error {code}: {info}", retry_after)
            self.metrics.upstream_errors.labels("api_error").inc()
            raise ToolError("upstream", f"API error {code}: {info}")
        return body

    async def _api(self, params: dict) -> dict:
        """One API call: retries a retryable failure with exponential backoff and jitter; a Retry-After header sets
        the delay instead, and one longer than max_backoff_s gives up (a rollout cannot wait that long)."""
        params = {"format": "json", "formatversion": "2", **params}
        if self.cfg.maxlag is not None:
            params["maxlag"] = str(self.cfg.maxlag)
        attempts = self.cfg.retries + 1
        for attempt in range(attempts):
            try:
                return await self._once(params)
            except _Retry as e:
                self.metrics.upstream_errors.labels(e.kind).inc()
                failure = f"{e.detail} (attempt {attempt + 1} of {attempts})"
                delay = e.retry_after
                if delay is None:
                    delay = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** attempt) * random.uniform(0.5, 1)
                elif delay > self.cfg.max_backoff_s:
                    failure += f"; asked to retry after {delay:g} s, more than wiki.max_backoff_s"
                    break
                if attempt + 1 < attempts:
                    await asyncio.sleep(delay)
        raise ToolError("upstream", f"{self.cfg.endpoint} failed: {failure}")

    @staticmethod
    def _page(body: dict, asked: str) -> _Page:
        """The one page of an answer for one title, after `normalized` and `redirects`; pages may be a list
        (formatversion 2) or an object keyed by page id (formatversion 1, older wikis)."""
        query = body.get("query")
        pages = query.get("pages") if isinstance(query, dict) else None
        if isinstance(pages, dict):
            pages = list(pages.values())
        if not pages or not isinstance(pages[0], dict):
            raise ToolError("upstream", f"the answer for {asked!r} has no page")
        title = asked
        for n in query.get("normalized", []):
            title = n["to"] if n.get("from") == title else title
        redirect_to = None
        for r in query.get("redirects", []):
            if r.get("from") == title:
                title = redirect_to = r["to"]
        page = pages[0]
        if "invalid" not in page and title_key(page.get("title", "")) != title_key(title):
            raise ToolError("upstream", f"asked for {asked!r}, the wiki answered for {page.get('title')!r}")
        return _Page(page.get("title", title), page, redirect_to)

    async def _as_of(self, title: str, as_of: dt.date, redirects: bool) -> _Page:
        """The newest revision of `title` at or before the end of `as_of` (following today's redirect if asked)."""
        params = dict(action="query", prop="revisions", titles=title, rvlimit="1", rvstart=end_of(as_of),
                      rvdir="older", rvprop="ids|timestamp|content", rvslots="main")
        if redirects:
            params["redirects"] = "1"
        body = await self._api(params)
        page = self._page(body, title)
        # An answer cut by the API's size limit holds no revision and says where to go on.
        for _ in range(3):
            if "revisions" in page.info or "continue" not in body or "rvcontinue" not in body["continue"]:
                break
            body = await self._api({**params, **body["continue"]})
            page = self._page(body, title)
        return page

    def _checked(self, page: _Page, as_of: dt.date) -> tuple[int, str, str]:
        """(revid, timestamp, wikitext) of the page's newest revision; every revision is checked against as_of."""
        revisions = page.info["revisions"]
        for rev in revisions:
            ts = rev.get("timestamp")
            try:
                check_timestamp(ts)
            except ValueError:
                raise ToolError("upstream", f"revision {rev.get('revid')} of {page.title!r} has no readable "
                                f"timestamp ({ts!r}); refused") from None
            if is_after(ts, as_of):
                self.metrics.leaks_refused.inc()
                log.warning("refused: %r as of %s answered with revision %s of %s", page.title, as_of,
                            rev.get("revid"), ts)
                raise ToolError("leak", f"asked for {page.title!r} as of {as_of}, the wiki answered with a later "
                                f"revision; refused{UNDATED}")
        rev = revisions[0]
        wikitext = _content(rev)
        if not isinstance(rev.get("revid"), int) or wikitext is None:
            raise ToolError("upstream", f"revision {rev.get('revid')!r} of {page.title!r} has no id or no text")
        return rev["revid"], rev["timestamp"], wikitext

    def _store(self, titles: list[str], as_of: dt.date, status: str, revisions: list[tuple[str, int, str, str]],
               resolved: str, chain: list[str]) -> list[str]:
        """One transaction: the revisions seen, and (once the day is over) what the titles showed. Returns the
        revisions' plain texts."""
        with self.cache.bulk():
            texts = [self.cache.put_revision(*rev) for rev in revisions]
            if is_over(as_of):
                for key in {title_key(t) for t in titles}:
                    self.cache.put_lookup(key, as_of, status, revid=revisions[-1][1] if status == "ok" else None,
                                          resolved_title=resolved, redirected_from=chain)
        return texts

    async def _fetch(self, title: str, as_of: dt.date) -> Revision:
        page = await self._as_of(title, as_of, redirects=True)
        todays_target = None
        if page.redirect_to is not None:  # today's redirect: ask what the source title itself was on the date
            todays_target, page = page, await self._as_of(title, as_of, redirects=False)
        requested = page.title
        chain: list[str] = []
        seen = {title_key(requested)}
        revisions: list[tuple[str, int, str, str]] = []  # (title, revid, timestamp, wikitext)
        while True:
            if "invalid" in page.info:
                raise ToolError("invalid_title", f"{page.title!r}: {page.info.get('invalidreason', 'invalid title')}")
            status = "missing" if "missing" in page.info else "ok" if page.info.get("revisions") else "not_yet"
            if status != "ok":
                break
            revid, timestamp, wikitext = self._checked(page, as_of)
            revisions.append((page.title, revid, timestamp, wikitext))
            target = redirect_target(wikitext)
            if target is None:
                break
            chain.append(page.title)
            if title_key(target) in seen:
                raise ToolError("invalid_title", f"{title!r}: redirects loop as of {as_of}: "
                                f"{' -> '.join(chain)} -> {target}")
            if len(chain) > MAX_REDIRECT_HOPS:
                raise ToolError("invalid_title", f"{title!r}: more than {MAX_REDIRECT_HOPS} redirects as of {as_of}")
            seen.add(title_key(target))
            if todays_target is not None and title_key(todays_target.redirect_to) == title_key(target):
                page, todays_target = todays_target, None  # the first answer holds that target as of the date
            else:
                page = await self._as_of(target, as_of, redirects=False)
        # Rendering a long page takes a while: off the event loop, so cache hits keep flowing meanwhile.
        texts = await asyncio.to_thread(self._store, [title, requested], as_of, status, revisions, page.title, chain)
        if status != "ok":
            raise _status_error(status, page.title, as_of, chain)
        _, revid, timestamp, _ = revisions[-1]
        return Revision(page.title, title, revid, timestamp, as_of, texts[-1], chain, "miss")

    # -------------------------------------------------------------------------------------------------- revisions

    def _from_cache(self, title: str, as_of: dt.date, c: Cached) -> Revision:
        if c.status != "ok":
            raise _status_error(c.status, c.resolved_title or title, as_of, c.redirected_from)
        if is_after(c.timestamp, as_of):  # only a hand-made cache file could hold this
            self.metrics.leaks_refused.inc()
            log.warning("refused: the cache maps %r as of %s to revision %s of %s", title, as_of, c.revid, c.timestamp)
            raise ToolError("leak", f"the cache maps {title!r} as of {as_of} to a later revision; refused{UNDATED}")
        return Revision(c.title, title, c.revid, c.timestamp, as_of, c.text, c.redirected_from, "hit")

    async def get(self, title: str, as_of: dt.date) -> Revision:
        """The page `title` as it stood at the end of `as_of` (UTC); a ToolError says why not."""
        check_title(title)
        cached = self.cache.lookup(title, as_of)
        if cached is not None:
            self.metrics.cache_hits.inc()
            return self._from_cache(title, as_of, cached)
        self.metrics.cache_misses.inc()
        if self.cfg.offline:
            raise ToolError("offline_miss", f"{title!r} as of {as_of} is not in the offline cache ({self.cache.path})")
        # Every sample of a GRPO group asks the same thing at once: one fetch answers them all.
        key = (title_key(title), as_of)
        fetch = self._inflight.get(key)
        if fetch is None:
            fetch = self._inflight[key] = asyncio.ensure_future(self._fetch(title, as_of))
            fetch.add_done_callback(lambda _: self._inflight.pop(key, None))
        rev = await asyncio.shield(fetch)
        return dataclasses.replace(rev, requested_title=title)

    # ------------------------------------------------------------------------------------------------------ search

    async def _created(self, title: str) -> str | None:
        """When the page was created (its first revision), or None if it does not exist."""
        created = self.cache.created(title)
        if created is not None:
            return created
        body = await self._api(dict(action="query", prop="revisions", titles=title, rvlimit="1", rvdir="newer",
                                    rvprop="timestamp"))
        page = self._page(body, title)
        revisions = page.info.get("revisions")
        if not revisions:
            return None
        try:
            created = check_timestamp(revisions[0].get("timestamp"))
        except ValueError:
            raise ToolError("upstream", f"the first revision of {page.title!r} has no readable timestamp") from None
        self.cache.put_page(page.title, created)
        return created

    async def _shown(self, title: str, as_of: dt.date) -> tuple[Revision | None, bool]:
        """(what a search candidate showed as of the date, or None to drop it; whether the upstream's answer for it
        was refused as a leak)."""
        try:
            return await self.get(title, as_of), False
        except ToolError as e:
            if e.code in ("missing", "not_yet", "invalid_title", "leak"):
                return None, e.code == "leak"
            raise

    async def _candidate(self, title: str, as_of: dt.date) -> tuple[Revision | None, bool]:
        """`_shown` for a title of today's search index, which may name a page created after the date."""
        created = await self._created(title)
        if created is None or is_after(created, as_of):
            return None, False
        return await self._shown(title, as_of)

    async def search(self, query: str, as_of: dt.date, limit: int | None = None) -> Found:
        """Pages as they stood at the end of `as_of`, ranked by how their text then matches `query` (module
        docstring): from the cache's index as of the date, or with `live_search`, for a query it finds nothing for,
        from today's search index's candidates."""
        if not query.strip():
            raise ToolError("bad_request", "query is empty")
        limit = min(limit or self.cfg.search_limit, self.cfg.search_limit)
        hits, cache = self.cache.rank_as_of(query, as_of, self.cfg.search_candidates), "hit"
        if hits and not self.cfg.offline:
            # the index holds each page's newest revision in the cache at or before the date: show the one it had then
            shown = [rev for rev, _ in await asyncio.gather(*(self._shown(h["title"], as_of) for h in hits)) if rev]
            hits = self.cache.rank_revisions(query, [rev.revid for rev in shown], limit)
            cache = "hit" if all(rev.cache == "hit" for rev in shown) else "miss"
        else:
            self.metrics.cache_hits.inc()
        found = self._refuse_later(hits[:limit], as_of)
        if found or not self.cfg.live_search or self.cfg.offline:
            return Found(found, cache)
        self.metrics.live_searches.inc()  # today's index picks the candidates (now, or when the memo was made)
        memo = self.cache.search_results(query, as_of)
        if memo is not None:
            self.metrics.cache_hits.inc()
            return Found(memo[:limit], "hit")
        self.metrics.cache_misses.inc()
        body = await self._api(dict(action="query", list="search", srsearch=query, srprop="", srinfo="",
                                    srlimit=str(self.cfg.search_candidates)))
        hits = (body.get("query") or {}).get("search")
        if not isinstance(hits, list):
            raise ToolError("upstream", f"the search answer for {query!r} has no results list")
        titles = [h["title"] for h in hits if isinstance(h, dict) and isinstance(h.get("title"), str)]
        candidates = await asyncio.gather(*(self._candidate(t, as_of) for t in titles))
        revids = [rev.revid for rev, _ in candidates if rev is not None]
        results = self._refuse_later(self.cache.rank_revisions(query, revids, self.cfg.search_limit), as_of)
        if is_over(as_of) and not any(refused for _, refused in candidates):  # a refusal may hide a good page
            self.cache.put_search(query, as_of, results)
        return Found(results[:limit], "miss")

    def _refuse_later(self, results: list[dict], as_of: dt.date) -> list[dict]:
        later = [r for r in results if is_after(r["timestamp"], as_of)]
        if later:  # cannot happen through this client; a guard on what the model is shown
            self.metrics.leaks_refused.inc(len(later))
            log.warning("refused: search as of %s found later revisions %s", as_of, [r["revid"] for r in later])
            raise ToolError("leak", f"search as of {as_of} found later revisions; refused{UNDATED}")
        return results
