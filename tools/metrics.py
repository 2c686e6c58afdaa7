"""The tools' Prometheus metrics, on a registry of their own: two services in one process (tests, a driver that
also hosts one) never clash, and `/metrics` shows exactly one service's numbers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

# The cache-hit path answers in well under a millisecond, so the buckets start there.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ToolMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r, p = self.registry, "forecast_tools_"
        self.requests = Counter(p + "requests", "Service requests, by endpoint and outcome (ok or the error code)",
                                ["endpoint", "status"], registry=r)
        self.cache_hits = Counter(p + "cache_hits", "Lookups answered from the cache", registry=r)
        self.cache_misses = Counter(p + "cache_misses", "Lookups the cache could not answer", registry=r)
        self.upstream_requests = Counter(p + "upstream_requests", "HTTP requests sent to the MediaWiki API",
                                         registry=r)
        self.upstream_errors = Counter(p + "upstream_errors", "Failed MediaWiki API requests, by kind", ["kind"],
                                       registry=r)
        self.leaks_refused = Counter(p + "leaks_refused", "Upstream answers later than the as-of date, refused",
                                     registry=r)
        self.live_searches = Counter(p + "live_searches", "Searches whose candidates came from the wiki's search "
                                     "index of today (wiki.live_search), not from the pages as of the date",
                                     registry=r)
        self.request_seconds = Histogram(p + "request_seconds", "Service request latency", ["endpoint"],
                                         buckets=LATENCY_BUCKETS, registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
