"""A fake MediaWiki Action API for tests: a real HTTP server on 127.0.0.1 (FastAPI + uvicorn in a thread) that
answers `action=query` (`prop=revisions`, `list=search`) in api.php's JSON shapes, from page histories in fixture
files, with faults injected on demand.

    with FakeMediaWiki() as wiki:                 # tests/fixtures/mediawiki/{articles,redirects}.json
        cfg = WikiConfig(endpoint=wiki.url, ...)
        wiki.inject("status", status=500, times=2)
        wiki.inject("api_error", code="maxlag", retry_after=0.1)
        wiki.latency_s = 0.05                     # every answer this much later
        wiki.lie = 1.0                            # this share of revision answers: the newest, whatever was asked
        wiki.max_in_flight, wiki.requests         # the most requests in flight at once; every request's params
        wiki.reset()                              # between tests sharing one server

Faults (`inject` queues `times` of one kind; each request takes the first one queued):

| kind | answer |
| --- | --- |
| `status` | HTTP `status` (500, 429, ...), with `Retry-After: retry_after` if given |
| `api_error` | HTTP 200 `{"error": {"code": code}}` (maxlag, ratelimited, ...), with Retry-After if given |
| `truncate` | the real answer cut in half |
| `sleep` | the real answer after `seconds` (longer than the client's timeout: a timeout) |
| `later` | the newest revision, not the newest at or before `rvstart` (a lying upstream, once) |
| `cut` | the page without its revision and a `continue` to get it (the API's answer-size limit) |

What is "today" for the fake is each page's last revision: it decides `redirects=1` and what search matches (and
search answers always carry today's snippets, which a client must never show). A fixture file is
`{"pages": {title: [{"revid", "timestamp", "content"}, ...]}, "invalid": {title: reason}, "layout": "slots"}`;
`"layout": "legacy"` answers as MediaWiki before 1.25 did (formatversion 1, content as `*` on the revision).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import random
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response

from tools.config import WikiConfig
from tools.service import RunningService, run_app_in_thread

FIXTURES = Path(__file__).parent / "fixtures" / "mediawiki"
DEFAULT_FIXTURES = (FIXTURES / "articles.json", FIXTURES / "redirects.json")
ILLEGAL = re.compile(r"[#<>\[\]|{}]")
REDIRECT = re.compile(r"^\s*#redirect\s*\[\[([^\]|#]+)", re.IGNORECASE)


@dataclasses.dataclass
class Fault:
    kind: str
    status: int = 500
    code: str = "maxlag"
    retry_after: float | None = None
    seconds: float = 0.0


def normalise(title: str) -> str:
    t = " ".join(title.replace("_", " ").split())
    return t[:1].upper() + t[1:]


class FakeMediaWiki:
    def __init__(self, *sources: dict | str | Path):
        self.pages: dict[str, list[dict]] = {}
        self.invalid: dict[str, str] = {}
        self.legacy = False
        for source in sources or DEFAULT_FIXTURES:
            data = source if isinstance(source, dict) else json.loads(Path(source).read_text())
            for title, revisions in data.get("pages", {}).items():
                self.pages[normalise(title)] = sorted(revisions, key=lambda r: (r["timestamp"], r["revid"]))
            self.invalid.update(data.get("invalid", {}))
            self.legacy = self.legacy or data.get("layout") == "legacy"
        self.pageids = {t: i for i, t in enumerate(sorted(self.pages), 1)}
        self.in_flight = 0
        self._running: RunningService | None = None
        self.reset()

    def reset(self) -> None:
        """No faults, no latency, no lies, the counters and the request log cleared."""
        self.faults: collections.deque[Fault] = collections.deque()
        self.latency_s = 0.0
        self.lie = 0.0
        self._rng = random.Random(0)
        self.max_in_flight = self.in_flight  # a request still sleeping from an earlier test finishes later
        self.requests: list[dict] = []

    def inject(self, kind: str, times: int = 1, **kw) -> None:
        self.faults.extend(Fault(kind, **kw) for _ in range(times))

    def config(self, cache: str | Path, **overrides) -> WikiConfig:
        """A client config for this fake: its URL, and retries fast enough for tests."""
        return WikiConfig(**{"endpoint": self.url, "cache": str(cache), "timeout_s": 2.0, "retries": 2,
                             "backoff_s": 0.01, "max_backoff_s": 1.0, **overrides})

    @property
    def url(self) -> str:
        return self._running.url + "/w/api.php"

    def __enter__(self) -> "FakeMediaWiki":
        self._running = run_app_in_thread(self._app())
        return self

    def __exit__(self, *exc) -> None:
        self._running.stop()

    # ------------------------------------------------------------------------------------------------------ answers

    def _redirect_today(self, title: str) -> str | None:
        m = REDIRECT.match(self.pages[title][-1]["content"]) if title in self.pages else None
        return normalise(m.group(1)) if m else None

    def _revision(self, rev: dict, rvprop: set[str]) -> dict:
        out = {"revid": rev["revid"], "parentid": 0} if "ids" in rvprop else {}
        if "timestamp" in rvprop:
            out["timestamp"] = rev["timestamp"]
        if "content" in rvprop:
            if self.legacy:
                out.update(contentformat="text/x-wiki", contentmodel="wikitext", **{"*": rev["content"]})
            else:
                out["slots"] = {"main": {"contentmodel": "wikitext", "contentformat": "text/x-wiki",
                                         "content": rev["content"]}}
        return out

    def _page(self, title: str, p: dict, lie: bool, cut: bool) -> tuple[dict, dict | None]:
        """(the page, the `continue` object or None)."""
        if ILLEGAL.search(title) or title in self.invalid or not title:
            reason = self.invalid.get(title) or (f'The requested page title contains invalid characters: '
                                                 f'"{ILLEGAL.search(title).group()}".' if title else "empty title")
            return {"title": title, "invalidreason": reason, "invalid": "" if self.legacy else True}, None
        if title not in self.pages:
            return {"ns": 0, "title": title, "missing": "" if self.legacy else True}, None
        page = {"pageid": self.pageids[title], "ns": 0, "title": title}
        newer = p.get("rvdir") == "newer"
        revs = list(self.pages[title]) if newer else self.pages[title][::-1]
        start = p.get("rvstart")
        if start and not lie:
            revs = [r for r in revs if (r["timestamp"] >= start if newer else r["timestamp"] <= start)]
        if "rvcontinue" in p:
            from_id = int(p["rvcontinue"].split("|")[1])
            revs = revs[[r["revid"] for r in revs].index(from_id):]
        if cut and revs:
            return page, {"rvcontinue": f"{revs[0]['timestamp']}|{revs[0]['revid']}", "continue": "||"}
        limit = int(p.get("rvlimit", 1))
        if revs[:limit]:
            page["revisions"] = [self._revision(r, set(p.get("rvprop", "ids|timestamp").split("|")))
                                 for r in revs[:limit]]
        more = revs[limit:limit + 1]
        return page, {"rvcontinue": f"{more[0]['timestamp']}|{more[0]['revid']}", "continue": "||"} if more else None

    def _revisions(self, p: dict, lie: bool, cut: bool) -> dict:
        asked = p.get("titles", "")
        title = asked if ILLEGAL.search(asked) else normalise(asked)
        query: dict = {}
        if title != asked:
            query["normalized"] = [{"fromencoded": False, "from": asked, "to": title}]
        target = self._redirect_today(title) if p.get("redirects") else None
        if target is not None:
            query["redirects"] = [{"from": title, "to": target}]
            title = target
        page, more = self._page(title, p, lie, cut)
        query["pages"] = {str(page.get("pageid", -1)): page} if self.legacy else [page]
        body = {"continue": more} if more else {"batchcomplete": "" if self.legacy else True}
        return {**body, "query": query}

    def _search(self, p: dict) -> dict:
        words = p.get("srsearch", "").lower().split()
        found = [t for t, revs in sorted(self.pages.items()) if not REDIRECT.match(revs[-1]["content"])
                 and all(w in (t + " " + revs[-1]["content"]).lower() for w in words)]
        hits = [{"ns": 0, "title": t, "pageid": self.pageids[t], "snippet": self.pages[t][-1]["content"][:120]}
                for t in found[:int(p.get("srlimit", 10))]]
        return {"batchcomplete": True, "query": {"search": hits}}

    def answer(self, p: dict, lie: bool = False, cut: bool = False) -> dict:
        if p.get("action") != "query":
            return {"error": {"code": "badvalue", "info": f"Unrecognized value for parameter \"action\": "
                                                          f"{p.get('action')}."}}
        if p.get("list") == "search":
            return self._search(p)
        if p.get("prop") == "revisions":
            return self._revisions(p, lie or self._rng.random() < self.lie, cut)
        return {"error": {"code": "badvalue", "info": "the fake answers prop=revisions and list=search only"}}

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/w/api.php")
        async def api(request: Request):
            p = dict(request.query_params)
            self.requests.append({"params": p, "user_agent": request.headers.get("user-agent", ""),
                                  "accept_encoding": request.headers.get("accept-encoding", "")})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                fault = self.faults.popleft() if self.faults else None
                kind = fault.kind if fault else None
                await asyncio.sleep(self.latency_s + (fault.seconds if kind == "sleep" else 0.0))
                retry_after = fault.retry_after if fault else None
                headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
                if kind == "status":
                    return Response(b"<html>Error</html>", fault.status, headers, media_type="text/html")
                if kind == "api_error":
                    body = {"error": {"code": fault.code, "info": f"fake {fault.code}"}, "servedby": "fake"}
                else:
                    body = self.answer(p, lie=kind == "later", cut=kind == "cut")
                raw = json.dumps(body).encode()
                return Response(raw[:len(raw) // 2] if kind == "truncate" else raw, 200, headers,
                                media_type="application/json")
            finally:
                self.in_flight -= 1

        return app
