"""Importers: the real ForecastBench sample (counts worked out independently from the JSON here, and checked against
numbers verified by hand), synthetic ForecastBench edge cases, and JSONL / CSV with a column mapping."""

import collections
import datetime as dt
import json

import pytest

from cluster import cli
from rollout import importers
from rollout import questions as qio
from tests.conftest import SHARED, needs_shared

FB = SHARED / "data" / "forecastbench"
QSET, RSET = FB / "2025-10-26-llm.json", FB / "2025-10-26_resolution_set.json"
needs_sample = needs_shared(QSET)
MARKETS = {"manifold", "metaculus", "polymarket", "infer"}
NO_OUTCOME = "dataset source: no resolved outcome for this date (its value is a level, not a probability)"
UNRESOLVED = "not resolved: resolved_to is a market value, not an outcome"


def _expected_counts():
    """Per source: market questions once each; dataset questions once per resolution date with a 0/1 outcome."""
    questions = json.loads(QSET.read_text())["questions"]
    rows = json.loads(RSET.read_text())["resolutions"]
    resolved = {(r["source"], r["id"], r["resolution_date"]) for r in rows if r["resolved"]}
    imported, no_outcome = collections.Counter(), 0
    for q in questions:
        if q["source"] in MARKETS:
            imported[q["source"]] += 1
            continue
        for d in q["resolution_dates"]:
            if (q["source"], q["id"], d) in resolved:
                imported[q["source"]] += 1
            else:
                no_outcome += 1
    unresolved = sum(not r["resolved"] for r in rows)
    return imported, no_outcome, unresolved


@pytest.fixture(scope="module")
def fb():
    return importers.import_forecastbench(QSET, RSET)


@needs_sample
def test_forecastbench_counts(fb):
    qs, report = fb
    imported, no_outcome, unresolved = _expected_counts()
    assert report.imported == imported
    assert report.skipped == {NO_OUTCOME: no_outcome}
    assert report.unused_resolutions == {UNRESOLVED: unresolved}
    # the same numbers, checked by hand against the files and their README
    assert dict(report.imported) == {"manifold": 77, "metaculus": 76, "polymarket": 76, "infer": 21, "acled": 200,
                                     "dbnomics": 197, "fred": 196, "wikipedia": 192, "yfinance": 192}
    assert no_outcome == 1019 and unresolved == 119 and len(qs) == 1227


@needs_sample
def test_forecastbench_markets(fb):
    qs, _ = fb
    raw = {(q["source"], q["id"]): q for q in json.loads(QSET.read_text())["questions"]}
    res = {(r["source"], r["id"]): r for r in json.loads(RSET.read_text())["resolutions"] if r["source"] in MARKETS}
    markets = [q for q in qs if q.source in MARKETS]
    assert len(markets) == 250
    outcomes = collections.Counter()
    for q in markets:
        source, qid = q.id.split("/", 1)
        fq, r = raw[(source, qid)], res.get((source, qid))
        assert q.market_prob == float(fq["freeze_datetime_value"])  # a string in the file
        assert q.as_of == dt.date(2025, 10, 16) and q.text == fq["question"]
        if r is not None and r["resolved"]:
            assert q.outcome == int(r["resolved_to"])
            assert q.resolution_date == dt.date.fromisoformat(r["resolution_date"])
            outcomes[source] += 1
        else:  # an unresolved row's resolved_to is a market value: never an outcome
            assert q.outcome is None
            assert q.resolution_date == dt.datetime.fromisoformat(fq["market_info_close_datetime"]).date()
    assert outcomes == {"manifold": 23, "metaculus": 11, "polymarket": 71, "infer": 7}  # 112, as in the README


@needs_sample
def test_forecastbench_dataset_questions(fb):
    qs, _ = fb
    data = [q for q in qs if q.source not in MARKETS]
    assert all(q.market_prob is None and q.outcome in (0, 1) for q in data)
    assert not any("{" in q.text for q in data)
    fred = next(q for q in data if q.id == "fred/DAAA/2025-11-02")
    assert fred.text == ("Will Moody's Seasoned Aaa Corporate Bond Yield have increased by 2025-11-02 as compared "
                         "to its value on 2025-10-26?")
    assert "Value on 2025-10-16: 5.13" in fred.background  # the level is information, not a probability
    assert fred.resolution_date == dt.date(2025, 11, 2)


@needs_sample
def test_forecastbench_without_resolutions():
    qs, report = importers.import_forecastbench(QSET)
    assert dict(report.imported) == {"manifold": 77, "metaculus": 76, "polymarket": 76, "infer": 21}
    assert report.skipped == {NO_OUTCOME: 1996}  # every dataset question, once per resolution date
    assert all(q.outcome is None for q in qs)


def _fb_files(tmp_path, questions, resolutions):
    q, r = tmp_path / "q.json", tmp_path / "r.json"
    q.write_text(json.dumps({"forecast_due_date": "2025-01-10", "questions": questions}))
    r.write_text(json.dumps({"forecast_due_date": "2025-01-10", "resolutions": resolutions}))
    return q, r


def _fbq(qid, source="metaculus", value="0.3", **kw):
    return dict(dict(id=qid, source=source, question=f"Question {qid}?", background="", resolution_criteria="N/A",
                     market_info_resolution_criteria="N/A", url="", freeze_datetime="2025-01-01T00:00:00+00:00",
                     freeze_datetime_value=value, market_info_close_datetime="2025-12-31T00:00:00+00:00",
                     resolution_dates="N/A"), **kw)


def _fbr(qid, source="metaculus", date="2025-02-01", value=1.0, resolved=True):
    return dict(id=qid, source=source, direction=None, resolution_date=date, resolved_to=value, resolved=resolved)


def test_forecastbench_edge_cases(tmp_path):
    questions = [
        _fbq("ok"),
        _fbq(["a", "b"]),                                   # combination question
        _fbq("na", value="N/A"),                            # no market value
        _fbq("big", value="42.5"),                          # a level in a market source
        _fbq("early"),                                      # resolved before its as-of date
        _fbq("x", source="newsite"),
        _fbq("ok"),                                         # listed twice
        _fbq("half"),
        _fbq("series", source="fred", value="5.1", question="Up by {resolution_date} from {forecast_due_date}?",
             resolution_dates=["2025-02-01", "2025-03-01"]),
    ]
    resolutions = [
        _fbr("ok", value=0.0),
        _fbr(["a", "b"]),
        _fbr("early", date="2024-12-01"),
        _fbr("half", value=0.5),
        _fbr("pending", value=0.61, resolved=False),
        _fbr("ghost"),
        _fbr("series", source="fred", date="2025-02-01", value=1.0),
    ]
    qs, report = importers.import_forecastbench(*_fb_files(tmp_path, questions, resolutions))
    assert sorted(q.id for q in qs) == ["fred/series/2025-02-01", "metaculus/half", "metaculus/ok"]
    assert report.skipped == {
        "combination question (list id)": 1,
        "market source: freeze_datetime_value is not a probability": 2,
        "resolution_date: as-of date is after the resolution date": 1,
        "unknown source 'newsite'": 1,
        "id: duplicate id": 1,
        NO_OUTCOME: 1,
    }
    assert report.unused_resolutions == {"combination question (list id)": 1, "resolved_to is not 0 or 1": 1,
                                         UNRESOLVED: 1, "no matching question (or date) in the question set": 1}
    by_id = {q.id: q for q in qs}
    assert by_id["metaculus/ok"].outcome == 0 and by_id["metaculus/ok"].market_prob == 0.3
    assert by_id["metaculus/half"].outcome is None
    assert by_id["fred/series/2025-02-01"].text == "Up by 2025-02-01 from 2025-01-10?"


def test_forecastbench_not_a_question_set(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"resolutions": []}))
    with pytest.raises(ValueError, match="'questions' list"):
        importers.import_forecastbench(bad)


@needs_sample
def test_import_command(tmp_path, capsys):
    out = tmp_path / "fb.parquet"
    assert cli.main(["data", "import", "forecastbench", str(QSET), str(RSET), "-o", str(out)]) == 0
    assert len(qio.read_parquet(out)) == 1227
    printed = capsys.readouterr().out
    assert "imported 1227 questions" in printed and "1019" in printed and UNRESOLVED in printed


# ------------------------------------------------------------------------------------------------ JSONL / CSV

CSV = """question,qid,p,resolved,asked,closes,notes
Will it rain?,r1,0.3,yes,2024-01-01,2024-02-01,x
Will it snow?,r2,0.1,,2024-01-01T12:00:00,,y
Will it hail?,r3,1.4,0,2024-01-01,,z
Will it fog?,r4,abc,0,2024-01-01,,z
,r5,0.5,,2024-01-01,,z
Will it blow?,r6,0.5,1,2024-03-01,2024-02-01,z
Will it rain?,r1,0.2,,2024-01-01,,dup
Will it thunder?,r7,0.5,maybe,2024-01-01,,z
Will it sleet?,r8,0.5,0,Jan 1,,z
"""
MAP = ["text=question", "id=qid", "market_prob=p", "outcome=resolved", "as_of=asked", "resolution_date=closes"]


def test_csv_with_mapping(tmp_path):
    path = tmp_path / "weather.csv"
    path.write_text(CSV)
    qs, report = importers.import_csv(path, importers.parse_mapping(MAP))
    assert [q.id for q in qs] == ["r1", "r2"]
    assert qs[0].outcome == 1 and qs[0].market_prob == 0.3 and qs[0].resolution_date == dt.date(2024, 2, 1)
    assert qs[1].outcome is None and qs[1].as_of == dt.date(2024, 1, 1) and qs[1].source == "weather"
    assert report.imported == {"weather": 2}
    assert report.skipped == {
        "market_prob: probability outside [0, 1]": 1,
        "market_prob: not a number": 1,
        "text: missing": 1,
        "resolution_date: as-of date is after the resolution date": 1,
        "id: duplicate id": 1,
        "outcome: outcome must be 0 or 1 (empty while unresolved)": 1,
        "as_of: not an ISO date": 1,
    }
    assert report.ignored_columns == ["notes"]


def test_jsonl_schema_names_need_no_mapping(tmp_path):
    path = tmp_path / "qs.jsonl"
    rows = [{"id": 1, "text": "One?", "market_prob": 0.25, "outcome": True, "source": "mine"},
            {"id": "2", "text": "Two?", "p_true": 0.5, "extra": [1]},
            {"id": "3", "text": "Three?", "market_prob": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    qs, report = importers.import_jsonl(path, source="fallback")
    assert [(q.id, q.source) for q in qs] == [("1", "mine"), ("2", "fallback"), ("3", "fallback")]
    assert qs[0].outcome == 1 and qs[1].p_true == 0.5 and qs[2].market_prob is None
    assert report.ignored_columns == ["extra"] and not report.skipped


def test_mapping_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown field 'question'"):
        importers.parse_mapping(["question=text"])
    with pytest.raises(ValueError, match="expected FIELD=COLUMN"):
        importers.parse_mapping(["text"])
    path = tmp_path / "weather.csv"
    path.write_text(CSV)
    with pytest.raises(ValueError, match="mapped columns not in the file: {'text': 'q'}"):
        importers.import_csv(path, {"text": "q"})
    with pytest.raises(ValueError, match=r"no column for required field\(s\) \['id', 'text'\]"):
        importers.import_csv(path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "A?"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not JSON"):
        importers.import_jsonl(bad)


def test_csv_import_command(tmp_path, capsys):
    path, out = tmp_path / "weather.csv", tmp_path / "w.parquet"
    path.write_text(CSV)
    argv = ["data", "import", "csv", str(path), "-o", str(out)]
    assert cli.main(argv + [x for m in MAP for x in ("--map", m)]) == 0
    assert [q.id for q in qio.read_parquet(out)] == ["r1", "r2"]
    assert "skipped 7:" in capsys.readouterr().out
    assert cli.main(argv + ["--map", "txt=question"]) == 2
    assert "unknown field 'txt'" in capsys.readouterr().err


def _fb_set(path, key, due, rows, name=None):
    path.write_text(json.dumps({"forecast_due_date": due, "question_set": name or f"{due}-llm.json", key: rows}))
    return path


def test_forecastbench_several_sets_keep_each_question_once(tmp_path):
    """Files or folders, in any order: a resolution set goes with the question set it names; a market asked again in
    a later set is kept once, as first asked (its as-of date, market and that set's resolution)."""
    sets = tmp_path / "sets"
    sets.mkdir()
    _fb_set(sets / "b.json", "questions", "2025-01-24",
            [_fbq("m1", value="0.4", freeze_datetime="2025-01-15T00:00:00+00:00"), _fbq("m3", value="0.2")])
    _fb_set(sets / "b_res.json", "resolutions", "2025-01-24", [_fbr("m1", value=0.0), _fbr("m3", resolved=False)])
    _fb_set(sets / "d_res.json", "resolutions", "2025-02-21", [_fbr("x"), _fbr("y")])  # its question set not given
    a = _fb_set(tmp_path / "a.json", "questions", "2025-01-10", [_fbq("m1"), _fbq("m2", value="0.6")])
    a_res = _fb_set(tmp_path / "a_res.json", "resolutions", "2025-01-10", [_fbr("m1", value=1.0)])
    c = _fb_set(tmp_path / "c.json", "questions", "2025-02-07", [_fbq("m4")])
    qs, report = importers.import_forecastbench(c, sets, a_res, a)
    by_id = {q.id: q for q in qs}
    assert sorted(by_id) == ["metaculus/m1", "metaculus/m2", "metaculus/m3", "metaculus/m4"]
    m1 = by_id["metaculus/m1"]  # the 2025-01-10 set's asking, with its own resolution set's outcome
    assert (m1.as_of, m1.market_prob, m1.outcome) == (dt.date(2025, 1, 1), 0.3, 1)
    assert by_id["metaculus/m3"].outcome is None and by_id["metaculus/m4"].outcome is None
    assert report.skipped == {"asked again in a later set: the earliest asking is kept": 1}
    assert report.unused_resolutions == {UNRESOLVED: 1,
                                         "no question set '2025-02-21-llm.json' given with its resolution set": 2}
    assert report.sets == ["a.json + a_res.json: 2 questions", "b.json + b_res.json: 2 questions",
                           "c.json + no resolution set (no outcomes): 1 questions"]
    with pytest.raises(ValueError, match="no question set among"):
        importers.import_forecastbench(a_res)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        importers.import_forecastbench(a, tmp_path / "nowhere.json")


@needs_sample
def test_forecastbench_all_shared_sets_split_without_sharing_a_market(tmp_path, capsys):
    """The 14 shared sets in one command: 1,806 distinct markets of 3,500 askings, each kept as first asked, and a
    time split of them that puts no market on both sides."""
    first = {}  # (source, id) -> the earliest freeze date among the sets that ask it, from the raw files
    for f in sorted(FB.glob("*-llm.json")):
        for q in json.loads(f.read_text())["questions"]:
            if q["source"] in MARKETS:
                day = dt.datetime.fromisoformat(q["freeze_datetime"]).date()
                first[q["source"], q["id"]] = min(day, first.get((q["source"], q["id"]), day))
    out = tmp_path / "all.parquet"
    assert cli.main(["data", "import", "forecastbench", str(FB), "-o", str(out)]) == 0
    assert "asked again in a later set: the earliest asking is kept" in capsys.readouterr().out
    markets = [q for q in qio.read_parquet(out) if q.source in MARKETS]
    assert len(first) == len(markets) == 1806
    assert all(q.as_of == first[tuple(q.id.split("/", 1))] for q in markets)
    train, held = tmp_path / "train.parquet", tmp_path / "eval.parquet"
    assert cli.main(["data", "split", str(out), "--cutoff", "2026-02-01", "--train", str(train),
                     "--eval", str(held)]) == 0
    ids = [{q.id for q in qio.read_parquet(p) if q.market_prob is not None} for p in (train, held)]
    assert (len(ids[0]), len(ids[1])) == (1117, 687) and not ids[0] & ids[1]
