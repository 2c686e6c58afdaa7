"""News: the importer names every bad row, the corpus is written atomically, and a search never returns an item
after the as-of date or before its window."""

import datetime as dt
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tools.config import NewsConfig
from tools.errors import ToolError
from tools.news import CORPUS_SCHEMA, NewsIndex, import_news, write_corpus

START = dt.date(2024, 1, 1)


def synthetic_corpus(n: int = 600, seed: int = 0) -> list[dict]:
    """Items over 2024 on a few topics; every summary names its own date, so a test can check what it was shown."""
    rng = random.Random(seed)
    topics = ["election", "bitcoin", "olympics", "storm", "merger"]
    return [dict(date=(d := START + dt.timedelta(days=rng.randrange(366))), title=f"{topic.title()} update {i}",
                 summary=f"News about the {topic} (dated {d}).", source=rng.choice(["wire", "daily"]),
                 url=f"https://news.example/{i}") for i, topic in ((i, rng.choice(topics)) for i in range(n))]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    path = tmp_path_factory.mktemp("news") / "corpus.parquet"
    write_corpus(synthetic_corpus(), path)
    return NewsIndex(NewsConfig(corpus=str(path), window_days=30, limit=50))


def test_never_after_the_date_nor_before_the_window(index):
    for as_of in (START + dt.timedelta(days=k) for k in range(0, 366, 7)):
        for topic in ("election", "bitcoin storm", "nothing"):
            results = index.search(topic, as_of)
            for r in results:
                day = dt.date.fromisoformat(r["date"])
                assert as_of - dt.timedelta(days=29) <= day <= as_of
                assert f"dated {r['date']}" in r["summary"]
            if topic == "nothing":
                assert results == []


def test_the_window_includes_both_ends(tmp_path):
    items = [dict(date=START + dt.timedelta(days=k), title=f"Storm day {k}", summary="a storm", source="wire")
             for k in range(10)]
    write_corpus(items, tmp_path / "c.parquet")
    index = NewsIndex(NewsConfig(corpus=str(tmp_path / "c.parquet"), window_days=3, limit=10))
    got = [r["date"] for r in index.search("storm", START + dt.timedelta(days=5))]
    assert got == ["2024-01-06", "2024-01-05", "2024-01-04"]  # newest first among equal matches
    assert len(index.search("storm", START + dt.timedelta(days=5), limit=2)) == 2
    with pytest.raises(ToolError, match="query is empty"):
        index.search("  ", START)


def test_title_matches_rank_first(tmp_path):
    items = [dict(date=START, title="Markets calm", summary="Bitcoin moved a little.", source="wire"),
             dict(date=START, title="Bitcoin soars", summary="Prices rose.", source="wire")]
    write_corpus(items, tmp_path / "c.parquet")
    index = NewsIndex(NewsConfig(corpus=str(tmp_path / "c.parquet")))
    assert [r["title"] for r in index.search("bitcoin", START)] == ["Bitcoin soars", "Markets calm"]


def test_import_names_bad_rows_and_counts_them_by_reason(tmp_path):
    lines = [
        dict(date="2024-05-01", title="Good", summary="s", source="wire", url="https://x"),
        dict(date="2024-05-01T23:30:00-05:00", title="Late evening in New York", summary="s", source="wire"),
        dict(date="May 1st", title="Bad date", summary="s", source="wire"),
        dict(date="2024-05-02", summary="s", source="wire"),
        dict(date="2024-05-02", title="  ", summary="s", source="wire"),
        dict(date="2024-05-01", title="Good", summary="again", source="wire"),
        dict(title="No date", summary="s", source="wire"),
    ]
    path = tmp_path / "news.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    items, report = import_news(path, "jsonl")
    assert [(i.title, i.date) for i in items] == [("Good", dt.date(2024, 5, 1)),
                                                  ("Late evening in New York", dt.date(2024, 5, 2))]  # its UTC day
    text = "\n".join(report.lines())
    assert "row 2: date: not an ISO date or datetime (got 'May 1st')" in text
    assert "row 3: title: missing" in text
    assert "row 4: title: blank" in text
    assert "row 5: title: duplicate item (same date, title and source) (first at row 0)" in text
    assert "row 6: date: missing" in text
    assert report.imported == 2 and sum(report.skipped.values()) == 5
    assert report.skipped["title: missing"] == 1 and report.skipped["date: missing"] == 1


def test_import_csv_and_parquet_and_write_the_corpus(tmp_path):
    csv_path = tmp_path / "news.csv"
    csv_path.write_text("date,title,summary,source,url,extra\n2024-05-01,A,s,wire,,x\n2024-13-01,B,s,wire,,x\n")
    items, report = import_news(csv_path, "csv")
    assert [i.title for i in items] == ["A"] and items[0].url == ""
    assert report.skipped == {"date: not an ISO date or datetime": 1}
    out = tmp_path / "corpus.parquet"
    write_corpus(items, out)
    assert pq.read_schema(out).equals(CORPUS_SCHEMA) and not (tmp_path / "corpus.parquet.tmp").exists()
    items, report = import_news(out, "parquet")
    assert [i.title for i in items] == ["A"] and report.imported == 1


def test_a_corpus_of_the_wrong_shape_is_refused(tmp_path):
    pq.write_table(pa.table({"date": ["2024-01-01"], "title": ["t"], "summary": ["s"], "source": ["w"],
                             "url": [""]}), tmp_path / "strings.parquet")
    with pytest.raises(ValueError, match="column 'date' is string, not date32"):
        NewsIndex(NewsConfig(corpus=str(tmp_path / "strings.parquet")))
    with pytest.raises(FileNotFoundError, match="tools.news.corpus"):
        NewsIndex(NewsConfig(corpus=str(tmp_path / "absent.parquet")))
