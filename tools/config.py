"""The tools' configuration: the Wikipedia-revision client and cache, the news corpus, the service.

`tools/` is a leaf (it imports nothing from `rollout/`, `learner/` or `cluster/`), so its config lives here and
`cluster/config.py` embeds it as the job's `tools:` section; `forecast-grpo wiki serve --config FILE` reads the
same section from a job config.

"As of a date D" means through the end of D in UTC: a revision stamped D 23:59:59Z is shown, one stamped the next
second is not; news dated D is shown. Every tool answer carries the timestamps of what it shows.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    """The base of every config section of every role: unknown keys are errors, and so are wrong types, on loading
    and on assignment. Defined here because `tools/` is the leaf every role may import (it imports none of them)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WikiConfig(Strict):
    endpoint: str = "https://en.wikipedia.org/w/api.php"
    """The MediaWiki Action API to read revisions from. Callers never supply URLs; only this one is fetched."""
    user_agent: str = "forecast-grpo/0.1 (https://github.com/forecast-grpo/forecast-grpo)"
    """Wikimedia asks every client for a descriptive User-Agent with contact details; `contact` is appended."""
    contact: str = ""
    """An e-mail address or URL where the operators of this job can be reached (appended to the User-Agent)."""
    max_concurrency: int = Field(3, ge=1, le=3)
    """Upstream requests in flight at once, per process (Wikimedia's etiquette: at most 3)."""
    timeout_s: float = Field(10.0, gt=0)
    """Every upstream request's timeout (connect, read, write and pool)."""
    retries: int = Field(4, ge=0)
    """Retries after a retryable failure (429, maxlag/ratelimited, 5xx, timeout, truncated JSON)."""
    backoff_s: float = Field(1.0, ge=0)
    """First retry delay; doubles each retry (with jitter), capped by max_backoff_s. A Retry-After header wins."""
    max_backoff_s: float = Field(30.0, ge=0)
    maxlag: int | None = Field(5, ge=0)
    """Sent as `maxlag=`: the API refuses requests while its replicas lag more than this many seconds."""
    cache: str = "runs/wiki-cache.sqlite"
    """SQLite cache (WAL). A revision's text is stored once by revision id; (title, as-of date) maps to it."""
    snapshot: str | None = None
    """A Parquet snapshot (`forecast-grpo wiki snapshot export`) imported into the cache when the service starts."""
    offline: bool = False
    """Answer from the cache only; a miss is a tool error that says so (clusters ship a frozen snapshot)."""
    text_max_tokens: int = Field(512, ge=16)
    """Page text shown to the model is cut to this many tokens (counted with `tokenizer`)."""
    tokenizer: str | None = None
    """A Hugging Face tokenizer (folder or hub id) to count tokens with; None counts one token per 4 characters."""
    search_limit: int = Field(5, ge=1, le=50)
    """Titles a search returns at most."""
    live_search: bool = False
    """Search ranks the pages the cache holds as they stood on the as-of date (an FTS5 index over their revisions
    then): candidates and ranking from that date only. True adds a fallback for a query that finds nothing there:
    the wiki's own search, today's index, picks the candidates (checked and ranked as of the date), which tells the
    model what became notable later. Off by default; each use is counted (`forecast_tools_live_searches`)."""
    search_candidates: int = Field(10, ge=1, le=50)
    """With live_search: titles asked of the wiki's search per query. Each is checked as of the date (its creation,
    its text then), which costs up to two upstream requests the first time, so more candidates mean slower searches."""

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL of a MediaWiki api.php")
        return v


class NewsConfig(Strict):
    corpus: str | None = None
    """Parquet corpus of dated items (date, title, summary, source, url): `forecast-grpo news import`."""
    window_days: int = Field(30, ge=1)
    """Only items dated within this many days up to the as-of date (inclusive) are searched."""
    limit: int = Field(5, ge=1, le=50)
    """Items a search returns at most."""


class ServiceConfig(Strict):
    host: str | None = None
    """Address to bind. None: 127.0.0.1 for `forecast-grpo wiki serve`; the node's IP inside a Ray job."""
    port: int = Field(0, ge=0, le=65535)
    """0 picks a free port."""
    num_cpus: float = Field(0.25, ge=0)
    """Ray CPUs for the service actor inside a training job."""
    max_restarts: int = Field(3, ge=-1)
    """Inside a training job: times Ray restarts a service actor that died (-1: always). Its cache is on disk, so it
    comes back with everything it had; callers waiting meanwhile get a tool error, never a hang."""
    request_timeout_s: float = Field(30.0, gt=0)
    """A caller's (rollout worker's) timeout for one service request; a slow or dead service is a tool error."""


class ToolsConfig(Strict):
    wiki: WikiConfig = WikiConfig()
    news: NewsConfig = NewsConfig()
    service: ServiceConfig = ServiceConfig()
