"""News summaries as of a date: a Parquet corpus of dated items, ranked by SQLite FTS5 (bm25).

Only items dated on or before the as-of date and at most `window_days - 1` days before it are ever searched, and
every answer is checked again before it is returned. Dates are UTC days: an item stamped with a time zone is
counted on the UTC day it happened (23:30 at UTC-5 is the next day), so a time zone never lets a later item in.

`import_news` turns JSONL, CSV or Parquet into the corpus schema, validating rows the way the question importers
do: every bad row is named by its number (from 0) and field, and skipped rows are counted by reason. date, title,
summary and source are required; url may be empty.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import sqlite3
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

from tools.config import NewsConfig
from tools.errors import UNDATED, ToolError
from tools.fts import fts_match
from tools.metrics import ToolMetrics
from tools.rows import RowError, validate_row

log = logging.getLogger(__name__)

CORPUS_SCHEMA = pa.schema([
    pa.field("date", pa.date32(), nullable=False),
    pa.field("title", pa.string(), nullable=False),
    pa.field("summary", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("url", pa.string()),
])
FORMATS = ("jsonl", "csv", "parquet")


def _utc_date(v):
    if isinstance(v, str) and v.strip():
        try:
            v = dt.datetime.fromisoformat(v.strip())
        except ValueError:
            raise ValueError("not an ISO date or datetime") from None
    if isinstance(v, dt.datetime):
        return (v.astimezone(dt.timezone.utc) if v.tzinfo else v).date()
    if isinstance(v, dt.date):
        return v
    raise ValueError("not an ISO date or datetime")


def _nonblank(v: str) -> str:
    if not v.strip():
        raise ValueError("blank")
    return v.strip()


Text = Annotated[str, AfterValidator(_nonblank)]


class NewsItem(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    date: Annotated[dt.date, BeforeValidator(_utc_date)]
    title: Text
    summary: Text
    source: Text
    url: str = ""


@dataclass
class NewsImportReport:
    imported: int = 0
    skipped: Counter = field(default_factory=Counter)
    """Rows not written, per reason (a row with several problems counts once, by its first)."""
    errors: list[RowError] = field(default_factory=list)
    """Every problem of every bad row."""

    def lines(self) -> list[str]:
        out = [str(e) for e in self.errors]
        out.append(f"imported {self.imported} items")
        if self.skipped:
            out.append(f"skipped {sum(self.skipped.values())}:")
            out += [f"  {n:6d}  {r}" for r, n in self.skipped.most_common()]
        return out


def _read_rows(path: Path, fmt: str) -> list[dict]:
    if fmt == "parquet":
        return pq.read_table(path).to_pylist()
    if fmt == "csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None
            if not isinstance(rows[-1], dict):
                raise ValueError(f"{path}:{n}: expected a JSON object per line")
    return rows


def import_news(path: str | Path, fmt: str) -> tuple[list[NewsItem], NewsImportReport]:
    """The valid items of a JSONL / CSV / Parquet file (an item repeated with the same date, title and source is
    skipped) and a report of everything left out."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    report, good, seen = NewsImportReport(), [], {}
    for i, row in enumerate(_read_rows(path, fmt)):
        item, errors = validate_row(NewsItem, i, {k: v for k, v in row.items() if v is not None})
        if item is not None and (item.date, item.title, item.source) in seen:
            errors = [RowError(i, "title", "duplicate item (same date, title and source)",
                               f"first at row {seen[item.date, item.title, item.source]}")]
        if errors:
            report.errors += errors
            report.skipped[errors[0].reason] += 1
            continue
        seen[item.date, item.title, item.source] = i
        good.append(item)
    report.imported = len(good)
    return good, report


def write_corpus(rows: list[NewsItem | dict], path: str | Path) -> None:
    """Write atomically (a temporary file, then a rename): a reader sees the old corpus or the new one."""
    items = [r if isinstance(r, NewsItem) else NewsItem.model_validate(r) for r in rows]
    table = pa.Table.from_pylist([i.model_dump() for i in items], schema=CORPUS_SCHEMA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def read_corpus(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"news corpus not found: {path} (tools.news.corpus)")
    table = pq.read_table(path)
    for f in CORPUS_SCHEMA:
        if f.name not in table.column_names:
            raise ValueError(f"{path}: no column {f.name!r}; a corpus has {', '.join(CORPUS_SCHEMA.names)} "
                             "(forecast-grpo news import writes one)")
        if table.schema.field(f.name).type != f.type:
            raise ValueError(f"{path}: column {f.name!r} is {table.schema.field(f.name).type}, not {f.type}")
        if not f.nullable and table[f.name].null_count:
            raise ValueError(f"{path}: column {f.name!r} has {table[f.name].null_count} empty values")
    return table.select(CORPUS_SCHEMA.names)


class NewsIndex:
    def __init__(self, cfg: NewsConfig, metrics: ToolMetrics | None = None):
        if cfg.corpus is None:
            raise ValueError("no news corpus configured (tools.news.corpus)")
        self.cfg, self.metrics = cfg, metrics or ToolMetrics()
        table = read_corpus(cfg.corpus)
        # One in-memory database, read by any thread (the service's), one query at a time.
        self._db = sqlite3.connect(":memory:", check_same_thread=False)
        self._lock = threading.Lock()
        self._db.executescript("""
            CREATE TABLE items (id INTEGER PRIMARY KEY, date TEXT, title TEXT, summary TEXT, source TEXT, url TEXT);
            CREATE INDEX items_date ON items (date);
            CREATE VIRTUAL TABLE items_fts USING fts5(title, summary, content='items', content_rowid='id');""")
        self._db.executemany("INSERT INTO items (date, title, summary, source, url) VALUES (?, ?, ?, ?, ?)",
                             ((r["date"].isoformat(), r["title"], r["summary"], r["source"], r["url"] or "")
                              for r in table.to_pylist()))
        self._db.execute("INSERT INTO items_fts (items_fts) VALUES ('rebuild')")
        self._db.commit()
        self.size = table.num_rows

    def __len__(self) -> int:
        return self.size

    def search(self, query: str, as_of: dt.date, limit: int | None = None) -> list[dict]:
        """Items dated in [as_of - (window_days - 1), as_of] that match `query`, best first (a title match counts
        twice a summary match)."""
        if not query.strip():
            raise ToolError("bad_request", "query is empty")
        limit = min(limit or self.cfg.limit, self.cfg.limit)
        first = as_of - dt.timedelta(days=self.cfg.window_days - 1)
        with self._lock:
            rows = self._db.execute(
                "SELECT i.date, i.title, i.summary, i.source, i.url FROM items_fts JOIN items i ON i.id = "
                "items_fts.rowid WHERE items_fts MATCH ? AND i.date BETWEEN ? AND ? "
                "ORDER BY bm25(items_fts, 2.0, 1.0), i.date DESC, i.id LIMIT ?",
                (fts_match(query), first.isoformat(), as_of.isoformat(), limit)).fetchall()
        later = [r for r in rows if r[0] > as_of.isoformat()]
        if later:  # the query above cannot return these; checked again because this is what the model sees
            self.metrics.leaks_refused.inc(len(later))
            log.warning("refused: news as of %s found items dated %s", as_of, sorted({r[0] for r in later}))
            raise ToolError("leak", f"news as of {as_of} found later items; refused{UNDATED}")
        return [dict(date=d, title=t, summary=s, source=src, url=u) for d, t, s, src, u in rows]

    def close(self) -> None:
        self._db.close()
