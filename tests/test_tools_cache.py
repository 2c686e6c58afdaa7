"""The SQLite revision cache: what it stores, what it refuses, transactions, and the Parquet snapshot."""

import datetime as dt
import re
import sqlite3
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tools.cache import SNAPSHOT_SCHEMA, WikiCache

D = dt.date(2020, 6, 1)


def rows(cache: WikiCache) -> dict:
    conn = sqlite3.connect(cache.path)
    out = {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall())
           for t in ("revisions", "lookups", "pages", "searches")}
    conn.close()
    return out


@pytest.fixture
def cache(tmp_path):
    c = WikiCache(tmp_path / "cache.sqlite")
    c.put_revision("paris", 1, "2020-01-01T00:00:00Z", "'''Paris''' is the [[capital]] of France.{{Infobox}}")
    c.put_revision("Paris", 2, "2021-01-01T00:00:00Z", "Paris hosted the Olympics.")
    c.put_revision("Lutetia", 3, "2019-01-01T00:00:00Z", "#REDIRECT [[Paris]]")
    c.put_lookup("paris", D, "ok", 1)
    c.put_lookup("Lutetia", D, "ok", 1, resolved_title="Paris", redirected_from=["Lutetia"])
    c.put_lookup("Nowhere", D, "missing")
    c.put_page("Paris", "2020-01-01T00:00:00Z")
    c.put_search("capital", D, [dict(title="Paris", revid=1, timestamp="2020-01-01T00:00:00Z", snippet="capital")])
    yield c
    c.close()


def test_a_revision_is_stored_once_and_looked_up_by_normalised_title(cache):
    assert cache.revision_count() == 3
    for title in ("Paris", "paris", " Paris ", "Paris"):
        hit = cache.lookup(title, D)
        assert (hit.status, hit.revid, hit.title, hit.text) == ("ok", 1, "Paris", "Paris is the capital of France.")
    assert cache.lookup("Lutetia", D).redirected_from == ["Lutetia"]
    assert cache.lookup("Nowhere", D).status == "missing"
    assert cache.lookup("Paris", D + dt.timedelta(days=1)) is None
    cache.put_revision("Paris", 1, "2020-01-01T00:00:00Z", "other text")  # a revision never changes
    assert cache.lookup("Paris", D).text == "Paris is the capital of France."
    assert sqlite3.connect(cache.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("call, message", [
    (lambda c: c.put_lookup("Paris", D, "ok", 2), "revision 2 (2021-01-01T00:00:00Z) is later than as_of 2020-06-01"),
    (lambda c: c.put_lookup("Paris", D, "ok", 99), "revision 99 is not in the cache"),
    (lambda c: c.put_lookup("Paris", D, "ok"), "status ok needs a revid"),
    (lambda c: c.put_lookup("Paris", D, "gone"), "status"),
    (lambda c: c.put_revision("Paris", 4, "2020-01-01 00:00", "x"), "not a MediaWiki timestamp"),
    (lambda c: c.put_revision(" ", 4, "2020-01-01T00:00:00Z", "x"), "blank"),
    (lambda c: c.put_search("q", D, [dict(title="Paris", revid=2, timestamp="2021-01-01T00:00:00Z", snippet="")]),
     "results later than as_of"),
])
def test_bad_writes_are_refused_and_change_nothing(cache, call, message):
    before = rows(cache)
    with pytest.raises(ValueError, match=re.escape(message)):
        call(cache)
    assert rows(cache) == before


def test_a_failed_bulk_write_leaves_nothing(cache):
    before = rows(cache)
    with pytest.raises(RuntimeError):
        with cache.bulk():
            cache.put_revision("Berlin", 10, "2020-01-01T00:00:00Z", "Berlin.")
            cache.put_lookup("Berlin", D, "ok", 10)
            raise RuntimeError("the fetch failed after its first write")
    assert rows(cache) == before
    with cache.bulk():
        cache.put_revision("Berlin", 10, "2020-01-01T00:00:00Z", "Berlin.")
        cache.put_lookup("Berlin", D, "ok", 10)
    assert cache.lookup("Berlin", D).revid == 10


def test_threads_share_one_cache_file(cache):
    errors = []

    def write(i):
        try:
            for j in range(20):
                revid = 1000 + i * 100 + j
                cache.put_revision(f"Page {i}", revid, "2020-01-01T00:00:00Z", f"text {j}")
                cache.put_lookup(f"Page {i} {j}", D, "ok", revid)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and cache.revision_count() == 3 + 80


def test_rank_uses_the_text_as_of_the_date(cache):
    assert [r["revid"] for r in cache.rank_as_of("capital olympics", D, 5)] == [1]
    assert [r["revid"] for r in cache.rank_as_of("capital olympics", dt.date(2021, 6, 1), 5)] == [2]
    assert cache.rank_as_of("Paris", dt.date(2019, 6, 1), 5) == []  # only a redirect then: not a page to show
    assert cache.rank_revisions("capital", [1, 2], 5)[0]["snippet"] == "Paris is the capital of France."
    assert cache.rank_revisions('"capital" OR AND (', [1, 2], 5)[0]["revid"] == 1  # the model's text is no syntax


def test_snapshot_round_trip_and_idempotent_import(cache, tmp_path):
    counts = cache.export_snapshot(tmp_path / "snap.parquet")
    assert counts == {"revision": 3, "lookup": 3, "page": 1, "search": 1}
    fresh = WikiCache(tmp_path / "fresh.sqlite")
    assert fresh.import_snapshot(tmp_path / "snap.parquet") == counts
    assert rows(fresh) == rows(cache)
    assert fresh.import_snapshot(tmp_path / "snap.parquet") == dict.fromkeys(counts, 0)
    assert rows(fresh) == rows(cache)
    assert fresh.rank_as_of("capital", D, 5)[0]["revid"] == 1  # the search index is rebuilt on import


def test_snapshot_import_names_every_bad_row_and_writes_nothing(tmp_path):
    table = pa.Table.from_pylist([
        dict(kind="revision", title="A", revid=1, timestamp="2020-01-01T00:00:00Z", wikitext="a"),
        dict(kind="revision", title="B", revid=2, timestamp="yesterday", wikitext="b"),
        dict(kind="lookup", title="A", as_of=D, status="ok"),
        dict(kind="page", title="A"),
        dict(kind="table", title="A"),
        dict(kind="lookup", title="A", as_of=dt.date(2019, 1, 1), status="ok", revid=1),
    ], schema=SNAPSHOT_SCHEMA)
    pq.write_table(table, tmp_path / "bad.parquet")
    cache = WikiCache(tmp_path / "cache.sqlite")
    with pytest.raises(ValueError) as err:
        cache.import_snapshot(tmp_path / "bad.parquet")
    msg = str(err.value)
    assert "row 1: timestamp: not a MediaWiki timestamp" in msg
    assert "row 2: (row): status ok needs a revid" in msg
    assert "row 3: created: missing" in msg
    assert "row 4: kind: not one of revision, lookup, page, search" in msg
    assert cache.revision_count() == 0
    pq.write_table(pa.concat_tables([table.slice(0, 1), table.slice(5, 1)]), tmp_path / "late.parquet")
    with pytest.raises(ValueError, match="row 1: revid: revision 1 .* is later than as_of 2019-01-01"):
        cache.import_snapshot(tmp_path / "late.parquet")
    assert cache.revision_count() == 0  # the revision row of the same file was rolled back with it
