"""The revision cache: embedded SQLite in WAL mode, shared safely by threads (a connection each) and processes.

Tables:

- `revisions(revid, title, timestamp, wikitext, text)`: a revision stored once by its id. `text` is its plain text
  (empty for a redirect), indexed by `revision_fts` (FTS5) so search ranks pages by bm25 over what they said then.
- `lookups(title_key, as_of, status, revid, resolved_title, redirected_from)`: what a title showed as of a date:
  `ok` and a revision, or `missing` / `not_yet` (valid answers too). Failures are never stored.
- `pages(title, created)`: a page's first revision's timestamp; search drops pages created after the as-of date.
- `searches(query_key, as_of, results)`: a finished live search's ranked answer (`wiki.live_search`), so a question
  asked again (by every sample of a GRPO group) gets the same answer without asking the upstream again.

Writes: each `put_*` is one transaction; inside `with cache.bulk():` all of them are one. The client writes a fetch's
revisions and its lookup in one transaction and only once everything checked out, so a failed or refused fetch
leaves the cache as it was, and SQLite makes a torn write impossible. A lookup may only point to a revision already
stored and not later than its date.

Snapshot (`export_snapshot` / `import_snapshot`): one Parquet file, a row per table row, `kind` naming the table;
plain text and the search index are rebuilt on import. Import is idempotent (rows already present are kept), checks
every row first and names the bad ones, and writes nothing unless all are good.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
import threading
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from tools.asof import check_timestamp, end_of, is_after
from tools.fts import fts_match
from tools.rows import RowError, raise_row_errors, validate_row
from tools.wikitext import plain_text, redirect_target

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS revisions (revid INTEGER PRIMARY KEY, title TEXT NOT NULL, timestamp TEXT NOT NULL,
                                      wikitext TEXT NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS revisions_title_time ON revisions (title, timestamp);
CREATE VIRTUAL TABLE IF NOT EXISTS revision_fts USING fts5(text, content='revisions', content_rowid='revid');
CREATE TABLE IF NOT EXISTS lookups (title_key TEXT NOT NULL, as_of TEXT NOT NULL, status TEXT NOT NULL,
                                    revid INTEGER REFERENCES revisions (revid), resolved_title TEXT,
                                    redirected_from TEXT NOT NULL, PRIMARY KEY (title_key, as_of));
CREATE TABLE IF NOT EXISTS pages (title TEXT PRIMARY KEY, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS searches (query_key TEXT NOT NULL, as_of TEXT NOT NULL, results TEXT NOT NULL,
                                     PRIMARY KEY (query_key, as_of));
"""


def title_key(title: str) -> str:
    """MediaWiki's normalised form of a main-namespace title: underscores are spaces, runs of spaces are one, the first
    letter is upper case. A title it gets wrong (other namespaces, odd case rules) only misses the cache."""
    t = " ".join(title.replace("_", " ").split())
    return t[:1].upper() + t[1:]


def query_key(query: str) -> str:
    return " ".join(query.lower().split())


def _nonblank(v: str) -> str:
    if not v.strip():
        raise ValueError("blank")
    return v


Title = Annotated[str, AfterValidator(_nonblank), AfterValidator(title_key)]
Timestamp = Annotated[str, AfterValidator(check_timestamp)]


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RevisionRow(_Row):
    title: Title
    revid: int = Field(gt=0)
    timestamp: Timestamp
    wikitext: str


class LookupRow(_Row):
    title: Title
    as_of: dt.date
    status: Literal["ok", "missing", "not_yet"]
    revid: int | None = Field(None, gt=0)
    resolved_title: Title | None = None
    redirected_from: list[str] = []

    @model_validator(mode="after")
    def _revid_iff_ok(self) -> "LookupRow":
        if (self.status == "ok") != (self.revid is not None):
            raise ValueError("status ok needs a revid; missing and not_yet have none")
        return self


class PageRow(_Row):
    title: Title
    created: Timestamp


class SearchHit(_Row):
    title: str
    revid: int
    timestamp: Timestamp
    snippet: str


class SearchRow(_Row):
    query: Annotated[str, AfterValidator(_nonblank)]
    as_of: dt.date
    results: list[SearchHit]

    @model_validator(mode="after")
    def _none_later(self) -> "SearchRow":
        later = [h.title for h in self.results if is_after(h.timestamp, self.as_of)]
        if later:
            raise ValueError(f"results later than as_of: {later}")
        return self


ROW_MODELS = {"revision": RevisionRow, "lookup": LookupRow, "page": PageRow, "search": SearchRow}
HIT = pa.struct([("title", pa.string()), ("revid", pa.int64()), ("timestamp", pa.string()), ("snippet", pa.string())])
SNAPSHOT_SCHEMA = pa.schema([
    ("kind", pa.string()), ("title", pa.string()), ("revid", pa.int64()), ("timestamp", pa.string()),
    ("wikitext", pa.string()), ("as_of", pa.date32()), ("status", pa.string()), ("resolved_title", pa.string()),
    ("redirected_from", pa.list_(pa.string())), ("created", pa.string()), ("query", pa.string()),
    ("results", pa.list_(HIT)),
])


class Cached(NamedTuple):
    """A stored lookup; the revision's fields are None unless status is ok."""
    status: str
    resolved_title: str | None
    redirected_from: list[str]
    revid: int | None
    title: str | None
    timestamp: str | None
    text: str | None


class WikiCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._conn()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise ValueError(f"{self.path}: cache schema version {version}, this code reads {SCHEMA_VERSION}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # autocommit: transactions are explicit (bulk); WAL with synchronous=NORMAL stays consistent on a crash
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    @contextlib.contextmanager
    def bulk(self):
        """One transaction for every write inside; nested, the outermost one commits. An exception rolls it back."""
        conn = self._conn()
        if conn.in_transaction:
            yield
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # ------------------------------------------------------------------------------------------------------ writes

    def _insert_revision(self, r: RevisionRow, text: str) -> int:
        conn = self._conn()
        cur = conn.execute("INSERT OR IGNORE INTO revisions VALUES (?, ?, ?, ?, ?)",
                           (r.revid, r.title, r.timestamp, r.wikitext, text))
        if cur.rowcount:
            conn.execute("INSERT INTO revision_fts (rowid, text) VALUES (?, ?)", (r.revid, text))
        return cur.rowcount

    def _lookup_problem(self, r: LookupRow) -> str | None:
        if r.revid is None:
            return None
        row = self._conn().execute("SELECT timestamp FROM revisions WHERE revid = ?", (r.revid,)).fetchone()
        if row is None:
            return f"revision {r.revid} is not in the cache"
        if is_after(row[0], r.as_of):
            return f"revision {r.revid} ({row[0]}) is later than as_of {r.as_of}"
        return None

    def _insert_lookup(self, r: LookupRow, verb: str) -> int:
        return self._conn().execute(
            f"INSERT OR {verb} INTO lookups VALUES (?, ?, ?, ?, ?, ?)",
            (r.title, r.as_of.isoformat(), r.status, r.revid, r.resolved_title, json.dumps(r.redirected_from)),
        ).rowcount

    def _insert_page(self, r: PageRow, verb: str) -> int:
        return self._conn().execute(f"INSERT OR {verb} INTO pages VALUES (?, ?)", (r.title, r.created)).rowcount

    def _insert_search(self, r: SearchRow, verb: str) -> int:
        results = json.dumps([h.model_dump() for h in r.results])
        return self._conn().execute(f"INSERT OR {verb} INTO searches VALUES (?, ?, ?)",
                                    (query_key(r.query), r.as_of.isoformat(), results)).rowcount

    def _stored_text(self, revid: int) -> str | None:
        row = self._conn().execute("SELECT text FROM revisions WHERE revid = ?", (revid,)).fetchone()
        return row and row[0]

    @staticmethod
    def _text(wikitext: str) -> str:
        return "" if redirect_target(wikitext) else plain_text(wikitext)

    def put_revision(self, title: str, revid: int, timestamp: str, wikitext: str) -> str:
        """Store a revision and return its plain text. A revision id already stored is kept as it is (revisions
        never change), and its text is not rendered again."""
        r = RevisionRow(title=title, revid=revid, timestamp=timestamp, wikitext=wikitext)
        stored = self._stored_text(r.revid)
        if stored is not None:
            return stored
        text = self._text(r.wikitext)
        with self.bulk():
            self._insert_revision(r, text)
        return text

    def put_lookup(self, title: str, as_of: dt.date, status: str, revid: int | None = None,
                   resolved_title: str | None = None, redirected_from: list[str] = ()) -> None:
        """What `title` showed as of `as_of` (replacing an earlier answer). An `ok` lookup's revision must be stored
        already and not be later than `as_of`."""
        r = LookupRow(title=title, as_of=as_of, status=status, revid=revid,
                      resolved_title=resolved_title or (title if status == "ok" else None),
                      redirected_from=list(redirected_from))
        with self.bulk():
            problem = self._lookup_problem(r)
            if problem:
                raise ValueError(f"lookup {r.title!r} as of {r.as_of}: {problem}")
            self._insert_lookup(r, "REPLACE")

    def put_page(self, title: str, created: str) -> None:
        with self.bulk():
            self._insert_page(PageRow(title=title, created=created), "REPLACE")

    def put_search(self, query: str, as_of: dt.date, results: list[dict]) -> None:
        with self.bulk():
            self._insert_search(SearchRow(query=query, as_of=as_of, results=results), "REPLACE")

    # ------------------------------------------------------------------------------------------------------- reads

    def lookup(self, title: str, as_of: dt.date) -> Cached | None:
        row = self._conn().execute(
            "SELECT l.status, l.resolved_title, l.redirected_from, r.revid, r.title, r.timestamp, r.text "
            "FROM lookups l LEFT JOIN revisions r ON r.revid = l.revid WHERE l.title_key = ? AND l.as_of = ?",
            (title_key(title), as_of.isoformat())).fetchone()
        if row is None:
            return None
        return Cached(row[0], row[1], json.loads(row[2]), *row[3:])

    def created(self, title: str) -> str | None:
        row = self._conn().execute("SELECT created FROM pages WHERE title = ?", (title_key(title),)).fetchone()
        return row and row[0]

    def search_results(self, query: str, as_of: dt.date) -> list[dict] | None:
        row = self._conn().execute("SELECT results FROM searches WHERE query_key = ? AND as_of = ?",
                                   (query_key(query), as_of.isoformat())).fetchone()
        return row and json.loads(row[0])

    def _rank(self, query: str, candidates_sql: str, params: tuple, limit: int) -> list[dict]:
        rows = self._conn().execute(
            "SELECT r.title, r.revid, r.timestamp, snippet(revision_fts, 0, '', '', '…', 32) "
            "FROM revision_fts JOIN revisions r ON r.revid = revision_fts.rowid "
            f"WHERE revision_fts MATCH ? AND revision_fts.rowid IN ({candidates_sql}) "
            "ORDER BY bm25(revision_fts), r.timestamp DESC, r.title LIMIT ?",
            (fts_match(query), *params, limit)).fetchall()
        return [dict(title=t, revid=i, timestamp=ts, snippet=s) for t, i, ts, s in rows]

    def rank_revisions(self, query: str, revids: list[int], limit: int) -> list[dict]:
        """These revisions that match `query` at all, best first by bm25 over their plain text."""
        return self._rank(query, "SELECT value FROM json_each(?)", (json.dumps(revids),), limit)

    def rank_as_of(self, query: str, as_of: dt.date, limit: int) -> list[dict]:
        """The same over each cached page's newest cached revision at or before `as_of`: search as of the date."""
        return self._rank(query, "SELECT revid FROM revisions r WHERE timestamp = (SELECT MAX(timestamp) FROM "
                          "revisions WHERE title = r.title AND timestamp <= ?)", (end_of(as_of),), limit)

    def revision_count(self) -> int:
        return self._conn().execute("SELECT count(*) FROM revisions").fetchone()[0]

    # ---------------------------------------------------------------------------------------------------- snapshot

    def export_snapshot(self, path: str | Path) -> dict[str, int]:
        """Write every row to one Parquet file (atomically: a crash leaves the old file or the new one)."""
        conn = self._conn()
        rows = [dict(kind="revision", revid=i, title=t, timestamp=ts, wikitext=w)
                for i, t, ts, w in conn.execute("SELECT revid, title, timestamp, wikitext FROM revisions")]
        rows += [dict(kind="lookup", title=t, as_of=dt.date.fromisoformat(d), status=s, revid=i, resolved_title=rt,
                      redirected_from=json.loads(rf)) for t, d, s, i, rt, rf in conn.execute("SELECT * FROM lookups")]
        rows += [dict(kind="page", title=t, created=c) for t, c in conn.execute("SELECT * FROM pages")]
        rows += [dict(kind="search", query=q, as_of=dt.date.fromisoformat(d), results=json.loads(r))
                 for q, d, r in conn.execute("SELECT * FROM searches")]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=SNAPSHOT_SCHEMA), tmp)
        tmp.replace(path)
        return {kind: sum(r["kind"] == kind for r in rows) for kind in ROW_MODELS}

    def import_snapshot(self, path: str | Path) -> dict[str, int]:
        """Add a snapshot's rows (those already present are kept); returns the rows added per kind."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"snapshot not found: {path}")
        table = pq.read_table(path)
        if "kind" not in table.column_names:
            raise ValueError(f"{path}: not a wiki cache snapshot (no 'kind' column)")
        parsed: dict[str, list[tuple[int, BaseModel]]] = {kind: [] for kind in ROW_MODELS}
        errors: list[RowError] = []
        for i, row in enumerate(table.to_pylist()):
            model = ROW_MODELS.get(row["kind"])
            if model is None:
                errors.append(RowError(i, "kind", f"not one of {', '.join(ROW_MODELS)}", f"got {row['kind']!r}"))
                continue
            good, errs = validate_row(model, i, {k: row[k] for k in model.model_fields if row.get(k) is not None})
            errors += errs
            if good is not None:
                parsed[row["kind"]].append((i, good))
        raise_row_errors(str(path), errors)
        # Rendering is the slow part of an import; a revision already cached is not rendered again.
        new = [(r, self._text(r.wikitext)) for _, r in parsed["revision"] if self._stored_text(r.revid) is None]
        added = dict.fromkeys(ROW_MODELS, 0)
        with self.bulk():
            for r, text in new:
                added["revision"] += self._insert_revision(r, text)
            for _, r in parsed["page"]:
                added["page"] += self._insert_page(r, "IGNORE")
            for _, r in parsed["search"]:
                added["search"] += self._insert_search(r, "IGNORE")
            for i, r in parsed["lookup"]:
                problem = self._lookup_problem(r)
                if problem:
                    errors.append(RowError(i, "revid", problem))
                else:
                    added["lookup"] += self._insert_lookup(r, "IGNORE")
            raise_row_errors(str(path), errors)
        return added
