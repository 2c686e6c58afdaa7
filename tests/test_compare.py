"""`forecast-grpo eval --compare NAME=FILE`: other systems' published forecasts read (`rollout/forecast_sets.py`),
matched to the questions and scored in the eval table. The ForecastBench fixture holds made-up forecasts on real ids
of the shared 2025-10-26 question set: 21 rows, of which 13 forecast a question the import keeps."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster import cli, evaluate_cli
from rollout import evaluate, forecast_sets, importers, leaderboard
from rollout import questions as qio
from rollout.questions import Question
from tests.conftest import SHARED, needs_shared

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "forecast_sets" / "2025-10-26.made-up.json"
FB = SHARED / "data" / "forecastbench"
QSET, RSET = FB / "2025-10-26-llm.json", FB / "2025-10-26_resolution_set.json"
ACLED = "afeef9ddc9b6c6d1773d7a0a0ba5bc1df5a1ceb0a01ff1b2995082894c463896"
EXPECTED = {  # the fixture's rows that forecast a question the import keeps, by our id
    "manifold/K8qazyZJ3tXyuLlzkkyk": 0.9, "manifold/YDHR6tZPck2B5Z406tph": 0.35, "metaculus/7994": 0.7,
    "metaculus/8505": 0.55, "polymarket/0x3e6cb7ad03e2687d0befe8706bb9ac276b3d74c0a8c7e02bf3c6b796e25601c0": 0.3,
    "polymarket/0x1672bfe7ef6d85a4ecffa9faf1149ef1a1661dd919598ab46b04a6ae0a4ffab4": 0.02, "infer/1560": 0.05,
    f"acled/{ACLED}/2025-11-02": 0.1, f"acled/{ACLED}/2025-11-25": 0.12, "fred/DAAA/2025-11-02": 0.6,
    "yfinance/URI/2026-01-24": 0.45,
    "wikipedia/8b6c74cb5bf033e46a25b9ff3bddc361af7720dd4b3bbbd6352ec8a9c283d406/2025-11-02": 0.05,
    "dbnomics/meteofrance_TEMPERATURE_celsius.07607.D/2025-11-02": 0.5,
}
UNMATCHED = ["fred/DAAA/2035-10-24", "metaculus/99999999"]  # a date not resolved yet (so not imported), an unknown id
INVALID = ["row 17: forecast: not a probability in [0, 1] (got 'abc')",
           "row 18: forecast: not a probability in [0, 1] (got 1.5)",
           "row 21: resolution_date: missing (a dataset question is forecast per resolution date)"]


def test_forecastbench_set():
    fs = forecast_sets.read_forecast_set(FIXTURE)
    assert fs.rows == 21
    assert fs.info == {"organization": "forecast-grpo tests", "model": "made-up forecasts on real ForecastBench ids",
                       "question_set": "2025-10-26-llm.json", "forecast_due_date": "2025-10-26"}
    # a market question matches on source and id, with or without a resolution date
    assert fs.forecasts == dict(EXPECTED, **dict.fromkeys(UNMATCHED, 0.5))
    assert [str(e) for e in fs.invalid] == INVALID
    assert fs.skipped == {forecast_sets.COMBINATION: 1}
    assert fs.duplicates == {"infer/1563": [8, 20]}  # 0.4 then 0.6: neither is kept
    assert "infer/1563" not in fs.forecasts


def test_forecastbench_rows_that_name_no_question(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"forecasts": [
        {"id": "DAAA", "source": "fred", "direction": None, "forecast": 0.5, "resolution_date": "soon"},
        {"id": "DAAA", "source": "fred", "forecast": 0.5, "resolution_date": "2025-11-02T00:00:00+00:00"},
        {"id": "7994", "source": "", "forecast": 0.5}, "0.5",
        {"id": "7994", "source": "metaculus", "forecast": 0.5, "resolution_date": "soon"}]}))  # a market's date unused
    fs = forecast_sets.read_forecast_set(path)
    assert fs.forecasts == {"fred/DAAA/2025-11-02": 0.5, "metaculus/7994": 0.5}
    assert fs.info == dict.fromkeys(forecast_sets.FB_INFO)
    assert [str(e) for e in fs.invalid] == ["row 1: resolution_date: not an ISO date (got 'soon')",
                                            "row 3: source: missing", "row 4: (row): not an object (got '0.5')"]


def test_jsonl_and_csv(tmp_path):
    csv = tmp_path / "mine.csv"
    csv.write_text("id,forecast,note\nm1,0.25,a\nm2,yes,b\n,0.5,c\nm3,0.5,d\nm3,0.5,e\nm4,1,f\n")
    fs = forecast_sets.read_forecast_set(csv)
    assert fs.forecasts == {"m1": 0.25, "m4": 1.0} and fs.rows == 6 and fs.info == {}
    assert [str(e) for e in fs.invalid] == ["row 3: forecast: not a probability in [0, 1] (got 'yes')",
                                            "row 4: id: missing"]  # CSV rows are lines: the header is line 1
    assert fs.duplicates == {"m3": [5, 6]} and fs.ignored_columns == ["note"]

    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text('{"id": 1, "forecast": 0.5}\n\nnot json\n{"id": "b", "forecast": null, "why": "x"}\n[1]\n')
    fs = forecast_sets.read_forecast_set(jsonl)
    assert fs.forecasts == {"1": 0.5} and fs.ignored_columns == ["why"] and fs.rows == 4
    assert [str(e) for e in fs.invalid] == ["row 3: (row): not a JSON object (got 'not json')",
                                            "row 4: forecast: not a probability in [0, 1] (got None)",
                                            "row 5: (row): not a JSON object (got '[1]')"]

    bad = tmp_path / "bad.csv"
    bad.write_text("question_id,p\nm1,0.5\n")
    with pytest.raises(ValueError, match="no column id or forecast .* its columns: question_id, p"):
        forecast_sets.read_forecast_set(bad)
    with pytest.raises(ValueError, match="expected a ForecastBench forecast set"):
        forecast_sets.read_forecast_set(bad.rename(tmp_path / "bad.txt"))
    question_set = tmp_path / "question_set.json"
    question_set.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match="'forecasts' list"):
        forecast_sets.read_forecast_set(question_set)
    with pytest.raises(FileNotFoundError):
        forecast_sets.read_forecast_set(tmp_path / "none.json")


QUESTIONS = [Question(id="a", text="A?", market_prob=0.5, outcome=1), Question(id="b", text="B?", market_prob=0.2),
             Question(id="c", text="C?", outcome=0), Question(id="d", text="D?", market_prob=0.9, outcome=1)]


def test_scored_on_the_questions_forecast():
    forecast = evaluate.align_forecasts(QUESTIONS, {"a": 0.5, "c": 0.9, "zz": 0.1})
    assert np.isnan(forecast[[1, 3]]).all() and forecast[[0, 2]].tolist() == [0.5, 0.9]
    s = evaluate.score_forecasts(QUESTIONS, forecast, missing="skip")
    assert s["questions"] == 2 and s["market_questions"] == 1 and s["resolved_questions"] == 2
    assert s["ce_market"] == pytest.approx(math.log(2))  # a only: b and d are not the system's to answer
    assert s["brier"] == pytest.approx((0.25 + 0.81) / 2)
    assert s["log_score"] == pytest.approx((math.log(0.5) + math.log(0.1)) / 2)
    c = forecast_sets.ForecastSet("x.csv", {"a": 0.5, "c": 0.9, "zz": 0.1}, rows=3).coverage([q.id for q in QUESTIONS])
    assert forecast_sets.coverage_line("x", c) == "x: 2 of 4 questions forecast; 1 rows unmatched (first: zz)"


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "eval.parquet"
    qio.write_parquet(QUESTIONS, path)
    sets = tmp_path / "sets.csv"
    sets.write_text("id,forecast\na,0.5\nc,0.9\n")
    return path, sets


def test_model_first_then_compared_then_baselines(small, tmp_path, monkeypatch, capsys):
    """With --model, its row leads; sampling is replaced by a constant (no engine starts in this test)."""
    path, sets = small
    model = tmp_path / "model"
    model.mkdir()
    monkeypatch.setattr(evaluate_cli, "sample_forecasts", lambda cfg, name, m, qs, n, url=None: evaluate.Samples(
        np.full((len(qs), n), 0.7), [["<answer>0.7</answer>"] * n] * len(qs), [["answer"] * n] * len(qs),
        np.ones(len(qs), bool)))
    out = tmp_path / "out"
    assert cli.main(["eval", "--model", str(model), "--data", str(path), "--samples", "2", "--compare",
                     f"mine={sets}", "--base-rate", "0.4", "-o", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["forecasters"]) == ["model", "mine", "always 0.5", "base rate", "market"]
    assert summary["forecasters"]["model"]["questions"] == 4 and summary["forecasters"]["mine"]["questions"] == 2
    printed = capsys.readouterr().out
    assert printed.index("\nmodel ") < printed.index("\nmine ") < printed.index("\nalways 0.5 ")
    assert "\nmine: 2 of 4 questions forecast\n" in printed
    # the model (0.7 everywhere) minus always 0.5, question by question, on the markets (a, b, d) and outcomes (a, c, d)
    vs = summary["vs"]["model"]["always 0.5"]
    ce = [-(m * math.log(0.7) + (1 - m) * math.log(0.3)) - math.log(2) for m in (0.5, 0.2, 0.9)]
    assert vs["ce"]["mean"] == pytest.approx(np.mean(ce)) and vs["ce"]["n"] == 3
    assert vs["brier"]["mean"] == pytest.approx(np.mean([0.09 - 0.25, 0.49 - 0.25, 0.09 - 0.25]))
    assert vs["brier"]["low"] <= vs["brier"]["mean"] <= vs["brier"]["high"]
    assert (f"model minus always 0.5: CE {evaluate.interval_text(vs['ce'])} (n 3)   Brier "
            f"{evaluate.interval_text(vs['brier'])} (n 3)") in printed
    assert set(summary["vs"]) == {"model"} and set(summary["vs"]["model"]) == {"always 0.5", "base rate", "market"}


def test_refused_before_anything_runs(small, tmp_path, capsys):
    path, sets = small
    out = tmp_path / "out"
    base = ["eval", "--data", str(path), "-o", str(out)]
    for argv, message in [
        ([], "nothing to evaluate: give --model, --compare NAME=FILE or --leaderboard FILE"),
        (["--compare", f"mine={sets}", "--leaderboard-model", "x"], "--leaderboard-model names a row of --leaderboard"),
        (["--compare", f"mine={sets}", "--baseline-model", str(tmp_path)], "--baseline-model is sampled beside"),
        (["--compare", str(sets)], "expected NAME=FILE"),
        (["--compare", f"market={sets}"], "the table already has a row 'market'"),
        (["--compare", f"mine={sets}", "--compare", f"mine={sets}"], "the table already has a row 'mine'"),
        (["--compare", f"mine={tmp_path / 'none.csv'}"], "file not found"),
    ]:
        assert cli.main(base + argv) == 2, argv
        assert message in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_text("id,forecast\nx,0.5\ny,2\n")
    assert cli.main(base + ["--compare", f"other={other}"]) == 2
    assert ("forecasts none of the questions in the data\n  other: 0 of 4 questions forecast; 1 rows unmatched "
            "(first: x); 1 invalid (row 3: forecast: not a probability in [0, 1] (got '2'))") in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def forecastbench_parquet(tmp_path_factory):
    qs, _ = importers.import_forecastbench(QSET, RSET)
    path = tmp_path_factory.mktemp("fb") / "fb.parquet"
    qio.write_parquet(qs, path)
    return path


@needs_shared(QSET)
def test_compare_forecastbench_set_end_to_end(forecastbench_parquet, tmp_path):
    """As a user runs it, with no model: the fixture scored on the imported question set, checked against the raw
    ForecastBench JSON by hand."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "cluster.evaluate_cli", "--data", str(forecastbench_parquet),
                           "--compare", f"claude={FIXTURE}", "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [ln.split()[0] for ln in lines[1:4]] == ["claude", "always", "market"]
    assert lines[1].split()[-1] == "13" and lines[3].split()[-1] == "250"  # n: questions scored
    assert (f"claude: 13 of 1227 questions forecast; 2 rows unmatched (first: {'; '.join(UNMATCHED)}); "
            f"3 invalid ({'; '.join(INVALID)}); 1 ids forecast more than once, none kept (infer/1563 rows 8, 20); "
            f"1 skipped: {forecast_sets.COMBINATION}") in lines

    raw = {f"{q['source']}/{q['id']}": q for q in json.loads(QSET.read_text())["questions"]}
    outcome = {f"{r['source']}/{r['id']}" + ("" if r["source"] in importers.FB_MARKET_SOURCES else
                                             f"/{r['resolution_date']}"): r["resolved_to"]
               for r in json.loads(RSET.read_text())["resolutions"] if r["resolved"]}
    market = {i: float(raw[i]["freeze_datetime_value"]) for i in EXPECTED if i in raw}
    ce = [-(m * math.log(EXPECTED[i]) + (1 - m) * math.log(1 - EXPECTED[i])) for i, m in market.items()]
    resolved = {i: outcome[i] for i in EXPECTED if i in outcome}
    brier = [(EXPECTED[i] - o) ** 2 for i, o in resolved.items()]
    logs = [math.log(EXPECTED[i] if o else 1 - EXPECTED[i]) for i, o in resolved.items()]
    assert len(market) == 7 and len(resolved) == 10  # 7 market questions (4 resolved), 6 dataset questions

    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] is None and list(summary["forecasters"]) == ["claude", "always 0.5", "market"]
    claude = summary["forecasters"]["claude"]
    assert claude["questions"] == 13 and claude["market_questions"] == 7 and claude["resolved_questions"] == 10
    assert claude["ce_market"] == pytest.approx(np.mean(ce))
    assert claude["brier"] == pytest.approx(np.mean(brier)) and claude["log_score"] == pytest.approx(np.mean(logs))
    got = claude["forecast_set"]
    assert got["model"] == "made-up forecasts on real ForecastBench ids" and got["rows"] == 21
    assert (got["forecast"], got["questions"], got["unmatched_ids"]) == (13, 1227, UNMATCHED)
    assert got["invalid_rows"] == INVALID and got["duplicates"] == {"infer/1563": [8, 20]}


LEADERBOARD = SHARED / "data" / "forecastbench" / "leaderboard_baseline.csv"


@needs_shared(LEADERBOARD)
def test_leaderboard_rows_beside_ours(small, tmp_path, capsys):
    """Their published rows on their questions, ours on the resolved market questions of the data (a and d here),
    each block saying whose; no model needed."""
    path, _ = small
    out = tmp_path / "out"
    assert cli.main(["eval", "--data", str(path), "--base-rate", "0.4", "--leaderboard", str(LEADERBOARD),
                     "--leaderboard-model", "claude-3-5-sonnet-20241022", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    theirs, ours = printed.split("THEIRS: ")[1].split("OURS: ")
    assert "on THEIR market questions" in theirs and "on OUR resolved market questions" in ours
    rows = {ln.split("  ")[1].strip(): ln.split()[-3:] for ln in theirs.splitlines()[2:]}
    assert rows == {"Superforecaster median forecast": ["83.5]", "0.073", "57"],
                    "Public median forecast": ["73.2]", "0.110", "57"], "Always 0.5": ["50.0]", "0.250", "3099"],
                    "claude-3-5-sonnet-20241022": ["60.8]", "0.165", "656"]}
    assert "claude-3-5-sonnet-20241022             59.4 [58.1, 60.8]" in theirs
    market = (0.5 ** 2 + 0.1 ** 2) / 2  # the market's Brier on a (0.5, it happened) and d (0.9, it happened)
    assert f"{leaderboard.brier_index(market):.1f} [" in ours.split("\n  market")[1].splitlines()[0]
    assert "always 0.5" in ours and "50.0 [50.0, 50.0]    0.250         2" in ours
    assert leaderboard.brier_index(0.073) == pytest.approx(72.98, abs=0.01)  # their index of their Brier
    summary = json.loads((out / "summary.json").read_text())["leaderboard"]
    assert [r["model"] for r in summary["theirs"]][-1] == "claude-3-5-sonnet-20241022"
    assert summary["ours_brier_market"]["market"]["mean"] == pytest.approx(market)
    assert summary["ours_brier_market"]["market"]["n"] == 2
    assert cli.main(["eval", "--data", str(path), "--leaderboard", str(LEADERBOARD), "--leaderboard-model",
                     "claude-3.5-sonnet"]) == 2
    assert "is not a row of the leaderboard; nearest: claude-3-5-sonnet" in capsys.readouterr().err
