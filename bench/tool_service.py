"""The tool service under load: cache hits against a static FastAPI endpoint, and the cold path's upstream bound.

    python bench/tool_service.py [--requests 3000] [--concurrency 32] [--latency-requests 1000] [--repeats 3]
                                 [--titles 100] [--cold-titles 120] [--upstream-latency 0.05]

Hot path: the real WikiRevisionService (its cache pre-filled, so every request is a cache hit; each answer checked)
and a static FastAPI endpoint returning the same payload bytes, each served by uvicorn in its own process, loaded
from this process by async httpx, cycling through `titles` pages. Throughput: `concurrency` requests in flight
(their latency is mostly queueing: 32 in flight at R req/s wait about 32/R s each). Latency: one request at a time.
Runs alternate (static, service, static, ...) so the shared machine's drift hits both; medians are reported.
Cold path: a service with an empty cache against the fake MediaWiki (a third process) answering each request after
`upstream-latency` seconds, `cold-titles` distinct pages asked for at once: the most upstream requests seen in
flight (the bound is 3) and the throughput that leaves (at most 3 / latency).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AS_OF = dt.date(2024, 6, 1)


def page_text(i: int) -> str:
    """About 3,000 characters of wikitext, the same length for every page, so every answer is the same size."""
    section = f"The subject number {i:04d} was discussed at length by several sources over the years. " * 8
    return f"'''Page {i:04d}''' is a page.{{{{Infobox|x}}}}\n\n== History ==\n{section}\n\n== Today ==\n{section}"


def _serve(app_factory: str, arg: str, ready) -> None:
    """A child process: build the app, bind a free port, report it, serve until terminated."""
    from tools.service import bind, make_server

    if app_factory == "service":
        from tools.config import ToolsConfig
        from tools.service import WikiRevisionService

        app = WikiRevisionService(ToolsConfig.model_validate_json(arg)).app
    else:
        from fastapi import FastAPI
        from fastapi.responses import Response

        app, payload = FastAPI(), arg.encode()

        @app.get("/revision")
        async def revision():
            return Response(payload, media_type="application/json")

    sock = bind("127.0.0.1", 0)
    ready.put(sock.getsockname()[1])
    make_server(app).run(sockets=[sock])


def _fake_upstream(pages: dict, latency_s: float, ready, stats, go, stop) -> None:
    """A child process: the fake MediaWiki (its own process, so the load generator's work never delays its answers),
    answering after latency_s; counts from `go` to `stop`, then reports (max in flight, requests)."""
    from tests.fake_mediawiki import FakeMediaWiki

    with FakeMediaWiki({"pages": pages}) as fake:
        ready.put(fake.url)
        go.wait()
        fake.reset()
        fake.latency_s = latency_s
        stop.wait()
        stats.put((fake.max_in_flight, len(fake.requests)))


def start(kind: str, arg: str) -> tuple[mp.Process, str]:
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(kind, arg, ready), daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{ready.get(timeout=60)}"
    import httpx

    for _ in range(600):  # the port is bound before uvicorn listens: wait for it
        try:
            httpx.get(url + "/revision", params={"title": "Page 0000", "as_of": str(AS_OF)}, trust_env=False)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"{kind} did not start")


async def load(url: str, titles: list[str], n: int, concurrency: int, expect: bytes | None = None) -> dict:
    """n GET /revision requests, `concurrency` at a time; req/s and latency percentiles (ms).

    Each of the `concurrency` workers has a client of its own with one keep-alive connection, made before the clock
    starts (a client builds an SSL context: milliseconds): one shared pool of 32 costs httpcore more per request than
    the server spends answering (its bookkeeping walks every connection on every request), which measured the load
    generator, not the servers."""
    import httpx

    latencies: list[float] = []
    hits = 0
    clients = [httpx.AsyncClient(base_url=url, trust_env=False, timeout=30, limits=httpx.Limits(max_connections=1))
               for _ in range(concurrency)]

    async def worker(w: int):
        nonlocal hits
        for i in range(w, n, concurrency):
            t0 = time.perf_counter()
            r = await clients[w].get("/revision", params={"title": titles[i % len(titles)], "as_of": str(AS_OF)})
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200 or (expect is not None and len(r.content) != len(expect)):
                raise RuntimeError(f"{url}: HTTP {r.status_code}, {len(r.content)} bytes: {r.text[:200]}")
            hits += r.content.endswith(b'"cache": "hit"}')

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        wall = time.perf_counter() - t0
        for client in clients:
            await client.aclose()
    q = statistics.quantiles(latencies, n=100)
    return {"rps": n / wall, "p50": q[49] * 1e3, "p99": q[98] * 1e3, "hits": hits}


def hot(args, tmp: Path) -> dict:
    from tools.cache import WikiCache
    from tools.config import ToolsConfig

    cache = WikiCache(tmp / "hot.sqlite")
    titles = [f"Page {i:04d}" for i in range(args.titles)]
    with cache.bulk():
        for i, title in enumerate(titles):
            cache.put_revision(title, 1000 + i, "2024-01-01T00:00:00Z", page_text(i))  # ids of one length
            cache.put_lookup(title, AS_OF, "ok", 1000 + i)
    cfg = ToolsConfig.model_validate({"wiki": {"cache": str(cache.path), "offline": True}})
    service, service_url = start("service", cfg.model_dump_json())
    import httpx

    payload = httpx.get(service_url + "/revision", params={"title": titles[0], "as_of": str(AS_OF)},
                        trust_env=False).content
    static, static_url = start("static", payload.decode())
    urls = {"static": static_url, "service": service_url}
    phases = {"throughput": (args.requests, args.concurrency), "latency": (args.latency_requests, 1)}
    runs: dict[tuple[str, str], list[dict]] = {(p, name): [] for p in phases for name in urls}
    try:
        for url in urls.values():  # warm up both: connections, the service's caches
            asyncio.run(load(url, titles, 500, args.concurrency, payload))
        for _ in range(args.repeats):
            for (phase, name), rs in runs.items():
                n, concurrency = phases[phase]
                rs.append(asyncio.run(load(urls[name], titles, n, concurrency, payload)))
                assert name == "static" or rs[-1]["hits"] == n, "a service request was not a cache hit"
    finally:
        for proc in (service, static):
            proc.terminate()
            proc.join(10)
    return {f"{phase} {name}": {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99")}
            for (phase, name), rs in runs.items()} | {"payload_bytes": len(payload)}


def cold(args, tmp: Path) -> dict:
    from tools.config import ToolsConfig

    titles = [f"Page {i:04d}" for i in range(args.cold_titles)]
    pages = {t: [{"revid": i + 1, "timestamp": "2024-01-01T00:00:00Z", "content": page_text(i)}]
             for i, t in enumerate(titles)}
    ctx = mp.get_context("spawn")
    ready, stats, go, stop = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    upstream = ctx.Process(target=_fake_upstream, args=(pages, args.upstream_latency, ready, stats, go, stop),
                           daemon=True)
    upstream.start()
    try:
        endpoint = ready.get(timeout=60)
        cfg = ToolsConfig.model_validate({"wiki": {"endpoint": endpoint, "cache": str(tmp / "cold.sqlite")}})
        service, url = start("service", cfg.model_dump_json())  # its first request (Page 0000) warms it up
        go.set()
        try:
            result = asyncio.run(load(url, titles[1:], len(titles) - 1, len(titles) - 1))
        finally:
            service.terminate()
            service.join(10)
        stop.set()
        max_in_flight, upstream_requests = stats.get(timeout=30)
    finally:
        upstream.join(10)
    return result | {"max_in_flight": max_in_flight, "upstream_requests": upstream_requests,
                     "bound_rps": 3 / args.upstream_latency}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--latency-requests", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--titles", type=int, default=100)
    ap.add_argument("--cold-titles", type=int, default=120)
    ap.add_argument("--upstream-latency", type=float, default=0.05)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        h = hot(args, Path(tmp))
        c = cold(args, Path(tmp))
    s, st = h["throughput service"], h["throughput static"]
    ls, lst = h["latency service"], h["latency static"]
    ratio = s["rps"] / st["rps"]
    print(f"hot path (every request a cache hit, {h['payload_bytes']} B answers; medians of {args.repeats}):")
    print(f"  throughput, {args.concurrency} in flight, {args.requests} requests:")
    for name, r in (("static FastAPI", st), ("tool service", s)):
        print(f"    {name:15s} {r['rps']:7.0f} req/s   p50 {r['p50']:6.2f} ms   p99 {r['p99']:6.2f} ms")
    print(f"  latency, one request at a time, {args.latency_requests} requests:")
    for name, r in (("static FastAPI", lst), ("tool service", ls)):
        print(f"    {name:15s} {r['rps']:7.0f} req/s   p50 {r['p50']:6.2f} ms   p99 {r['p99']:6.2f} ms")
    print(f"  ratio service/static {ratio:.2f} (target >= 0.8); service p99 {ls['p99']:.2f} ms one at a time, "
          f"{s['p99']:.2f} ms with {args.concurrency} in flight (target < 10)")
    print(f"cold path ({args.cold_titles - 1} distinct titles at once, upstream answers after "
          f"{args.upstream_latency * 1e3:.0f} ms): {c['upstream_requests']} upstream requests, at most "
          f"{c['max_in_flight']} in flight (bound 3); {c['rps']:.1f} req/s (bound {c['bound_rps']:.0f}), "
          f"p50 {c['p50']:.0f} ms, p99 {c['p99']:.0f} ms")
    print(json.dumps({"tool_service": {"hot": h, "cold": c}}, default=float))
    print(f"tool_service: hit {s['rps']:.0f} req/s vs static {st['rps']:.0f} (ratio {ratio:.2f}), p99 "
          f"{ls['p99']:.2f} ms one at a time, {s['p99']:.2f} ms at {args.concurrency} in flight; cold max_in_flight "
          f"{c['max_in_flight']} (<= 3), {c['rps']:.1f} req/s")


if __name__ == "__main__":
    main()
