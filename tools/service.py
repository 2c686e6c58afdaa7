"""WikiRevisionService: the tools over HTTP (FastAPI + uvicorn), and `serve_in_thread` to host one in a process.

    GET /revision?title=T&as_of=YYYY-MM-DD     a page as it stood at the end of that day (UTC), as plain text
    GET /search?q=Q&as_of=D[&limit=N]          pages that existed then, ranked by their text then
    GET /news?q=Q&as_of=D[&limit=N]            dated news items in the window up to D
    GET /health                                {"status": "ok", "offline", "revisions", "news_items"}
    GET /metrics                               Prometheus text (`forecast_tools_*`, tools/metrics.py)

Every answer is JSON; an error is `{"error": {"code", "message"}}` with the HTTP status of `tools/errors.py`.
Parameters are read from the query string as plain strings and checked here, so a bad one is a `bad_request` whose
message the model can read, not FastAPI's validation body. What a cache hit costs is kept small: the tool routes skip
FastAPI's dependency solving, the body is serialised once with `json.dumps` into a plain Response (FastAPI's encoder
walks every value again), and uvicorn's access log is off: each costs tens of microseconds, more than the lookup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import socket
import threading
import time
from collections.abc import Mapping

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from tools.cache import WikiCache
from tools.config import ToolsConfig
from tools.errors import HTTP_STATUS, ToolError
from tools.metrics import ToolMetrics
from tools.news import NewsIndex
from tools.wiki import WikiRevisionClient
from tools.wikitext import TextBudget

log = logging.getLogger(__name__)


def _as_of(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ToolError("bad_request", f"as_of {value!r} is not an ISO date (YYYY-MM-DD)") from None


def _limit(value: str) -> int | None:
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 50:
        raise ToolError("bad_request", f"limit {value!r} is not a whole number from 1 to 50")
    return int(value)


def _json(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body, ensure_ascii=False).encode(), status, media_type="application/json")


class WikiRevisionService:
    def __init__(self, cfg: ToolsConfig):
        self.cfg = cfg
        self.metrics = ToolMetrics()
        self.cache = WikiCache(cfg.wiki.cache)
        if cfg.wiki.snapshot:
            self.cache.import_snapshot(cfg.wiki.snapshot)
        self.wiki = WikiRevisionClient(cfg.wiki, self.cache, self.metrics)
        self.news = NewsIndex(cfg.news, self.metrics) if cfg.news.corpus else None
        self.budget = TextBudget(cfg.wiki.text_max_tokens, cfg.wiki.tokenizer)
        self.app = self._app()

    def _route(self, endpoint: str, work):
        """A GET handler: `work(query parameters)` answered as JSON, or its ToolError; counted and timed."""
        latency = self.metrics.request_seconds.labels(endpoint)

        async def handle(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                body, status, outcome = await work(request.query_params), 200, "ok"
            except ToolError as e:
                body, status, outcome = e.body(), HTTP_STATUS[e.code], e.code
            except Exception as e:  # a bug: the caller still gets a tool error (naming it), the log the traceback
                log.exception("%s failed", endpoint)
                body, status, outcome = ToolError("internal", f"{type(e).__name__}: {e}").body(), 500, "internal"
            self.metrics.requests.labels(endpoint, outcome).inc()
            latency.observe(time.perf_counter() - t0)
            return _json(body, status)

        return handle

    async def revision(self, p: Mapping[str, str]) -> dict:
        return (await self.wiki.get(p.get("title", ""), _as_of(p.get("as_of", "")))).answer(self.budget)

    async def search(self, p: Mapping[str, str]) -> dict:
        day, query = _as_of(p.get("as_of", "")), p.get("q", "")
        found = await self.wiki.search(query, day, _limit(p.get("limit", "")))
        return {"as_of": day.isoformat(), "query": query, "results": found.results, "cache": found.cache}

    async def news_search(self, p: Mapping[str, str]) -> dict:
        day, query = _as_of(p.get("as_of", "")), p.get("q", "")
        if self.news is None:
            raise ToolError("bad_request", "no news corpus configured (tools.news.corpus)")
        results = self.news.search(query, day, _limit(p.get("limit", "")))
        return {"as_of": day.isoformat(), "query": query, "results": results}

    def health(self) -> dict:
        return {"status": "ok", "offline": self.cfg.wiki.offline, "revisions": self.cache.revision_count(),
                "news_items": 0 if self.news is None else len(self.news)}

    def _app(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(_app):
            yield
            await self.wiki.aclose()

        app = FastAPI(title="forecast-grpo tools", lifespan=lifespan, docs_url=None, redoc_url=None,
                      openapi_url=None)

        # The tools are plain routes reading the query string: FastAPI's dependency solving and per-parameter
        # validation cost about as much as a whole cache hit, and every check is ours anyway.
        for endpoint, work in (("revision", self.revision), ("search", self.search), ("news", self.news_search)):
            app.add_route(f"/{endpoint}", self._route(endpoint, work), methods=["GET"])

        @app.get("/health")
        async def health():
            return _json(self.health())

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.text(), media_type=CONTENT_TYPE_LATEST)

        return app

    def close(self) -> None:
        self.cache.close()
        if self.news is not None:
            self.news.close()


@dataclasses.dataclass
class RunningService:
    url: str
    """http://host:port"""
    server: uvicorn.Server
    thread: threading.Thread
    service: WikiRevisionService | None = None

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        if self.service is not None:
            self.service.close()


def bind(host: str, port: int) -> socket.socket:
    """A socket listening on (host, port); port 0 lets the OS pick a free one, and binding first is how we learn it.
    It listens at once: a client that connects before uvicorn has started waits in the backlog, never refused."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # uvicorn's default backlog
    return sock


def make_server(app) -> uvicorn.Server:
    # log_config=None leaves the process's logging alone; the access log costs more than a cache hit
    return uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False,
                                         lifespan="on"))


def run_app_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0) -> RunningService:
    """Serve any ASGI app with uvicorn in a daemon thread; returns once it listens."""
    sock = bind(host, port)
    bound_port = sock.getsockname()[1]
    server = make_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server on {host}:{bound_port} did not start within {timeout_s:g} s")
        time.sleep(0.01)
    return RunningService(f"http://{f'[{host}]' if ':' in host else host}:{bound_port}", server, thread)


def serve_in_thread(cfg: ToolsConfig, host: str = "127.0.0.1", port: int = 0) -> RunningService:
    """A WikiRevisionService in a daemon thread of this process; returns once it answers /health."""
    service = WikiRevisionService(cfg)
    running = run_app_in_thread(service.app, host, port)
    running.service = service
    try:
        httpx.get(running.url + "/health", timeout=10.0, trust_env=False).raise_for_status()
    except Exception:
        running.stop()
        raise
    return running
