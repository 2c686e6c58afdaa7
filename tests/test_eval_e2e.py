"""`forecast-grpo eval` end to end: the tiny model (conftest's `tiny_model`, built if missing) on a few questions,
through the real vLLM engine (~30 s), two questions at a time, one of them too long to ask. The engine runs in a
child process, as a user runs it: an in-process engine leaves torch.distributed initialised, which later in-process
tests (the learner's) must not inherit."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cluster import cli
from rollout import evaluate
from rollout import questions as qio
from rollout.questions import Question

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    Question(id="dice/6/ge5", text="A fair 6-sided die is rolled. What is the probability the result is at least 5?",
             market_prob=1 / 3, p_true=1 / 3, source="synthetic/dice"),
    Question(id="m1", text="Will the market close higher?", market_prob=0.8, outcome=1, source="market"),
    Question(id="m2", text="Will it rain tomorrow?", market_prob=0.3, outcome=1, source="market"),
    Question(id="d1", text="Will the index rise?", outcome=0, source="dataset"),  # no market: outcome only
]
# ~1500 tokens: longer than rollout.max_model_len (512), so skipped and counted, and the others scored
LONG = Question(id="long", text=" ".join(f"clause {i} of a question too long to ask" for i in range(80)) + "?",
                source="dataset")


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "eval.parquet"
    qio.write_parquet(QUESTIONS[:2] + [LONG] + QUESTIONS[2:], path)
    train = tmp_path / "train.parquet"
    qio.write_parquet([Question(id=f"t{i}", text=f"T{i}?", outcome=o) for i, o in enumerate([1, 0, 0, 1, 1])], train)
    return path, train


def test_eval_end_to_end(tiny_model, data, tmp_path):
    path, train = data
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "eval", "--model", str(tiny_model), "--data", str(path),
                           "--samples", "3", "--train", str(train), "--baseline-model", str(tiny_model),
                           "-o", str(out), "--set", "run.eval_batch_questions=2"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = proc.stdout
    for row in ("model", "baseline model", "always 0.5", "base rate", "market"):
        assert f"\n{row} " in printed
    # the progress bar at every batch of two questions, then a line, and the question skipped named
    assert "eval model:" in proc.stderr and "samples/s]" in proc.stderr, proc.stderr[-2000:]
    for done in ("2/5", "4/5", "5/5"):
        assert f"| {done} [" in proc.stderr
    assert "eval model: 4 questions x 3 samples in " in printed
    assert ("warning: eval model: 1 of 5 questions skipped: their prompts leave no room for an answer in "
            "rollout.max_model_len=512 (first: long)") in printed

    pred = pq.read_table(out / "predictions.parquet").to_pylist()
    assert [r["id"] for r in pred] == [q.id for q in QUESTIONS]
    samples = np.array([[np.nan if s is None else s for s in r["samples"]] for r in pred], dtype=float)
    assert samples.shape == (4, 3)
    for r in pred:  # what each sample wrote, and why it ended
        assert len(r["texts"]) == len(r["end_reasons"]) == 3 and all(isinstance(t, str) for t in r["texts"])
        assert set(r["end_reasons"]) <= {"answer", "length"}
    parsed = [t for r in pred for f, t in zip(r["samples"], r["texts"]) if f is not None]
    assert parsed and all("<answer>" in t for t in parsed)  # a parsed forecast's text holds its answer
    assert np.all(np.isnan(samples) | ((samples >= 0) & (samples <= 1)))
    mean, median, fail = evaluate.point_forecasts(samples)
    for r, m, md, f in zip(pred, mean, median, fail):
        assert r["format_fail_share"] == pytest.approx(f)
        assert (r["forecast_mean"] is None) == math.isnan(m)
        if r["forecast_mean"] is not None:
            assert r["forecast_mean"] == pytest.approx(m) and r["forecast_median"] == pytest.approx(md)
    assert pred[1]["market_prob"] == 0.8 and pred[1]["outcome"] == 1 and pred[3]["market_prob"] is None
    assert (out / "baseline_predictions.parquet").is_file()

    summary = json.loads((out / "summary.json").read_text())
    rows = summary["forecasters"]
    assert summary["base_rate"]["value"] == pytest.approx(0.6)  # 3 of the 5 training outcomes
    # the model's row is its predictions, scored
    model = evaluate.score_forecasts(QUESTIONS, mean)
    for k in ("ce_market", "log_score", "brier", "ece", "sharpness"):
        assert rows["model"][k] == (None if math.isnan(model[k]) else pytest.approx(model[k]))
    assert rows["model"]["questions"] == 4 and rows["model"]["skipped_too_long"] == 1
    assert rows["model"]["skipped_too_long_first"] == ["long"] and rows["baseline model"]["skipped_too_long"] == 1
    assert rows["model"]["format_fail_rate"] == pytest.approx(np.isnan(samples).mean())
    # baselines, by hand: 3 questions with a market (p = 1/3, 0.8, 0.3), 3 resolved (outcomes 1, 1, 0)
    half = rows["always 0.5"]
    assert half["ce_market"] == pytest.approx(math.log(2)) and half["log_score"] == pytest.approx(-math.log(2))
    assert half["brier"] == pytest.approx(0.25) and half["ece"] == pytest.approx(abs(0.5 - 2 / 3))
    assert half["sharpness"] == 0 and half["questions"] == 5  # a baseline has an answer for the long one too
    assert rows["base rate"]["brier"] == pytest.approx((0.4 ** 2 + 0.4 ** 2 + 0.6 ** 2) / 3)
    market = rows["market"]
    assert market["questions"] == 3 and market["resolved_questions"] == 2  # d1 has no market
    assert market["brier"] == pytest.approx((0.2 ** 2 + 0.7 ** 2) / 2)
    assert market["skill"] == pytest.approx(1.0)
    assert "per_sample" in summary and not summary["per_sample"]  # d1 has no known probability
    # each model minus each baseline, with its interval and n: the model on the 3 market questions it was asked
    assert set(summary["vs"]) == {"model", "baseline model"}
    assert summary["vs"]["model"]["always 0.5"]["ce"]["n"] == 3 and "model minus always 0.5: CE " in printed


def test_eval_refuses_before_starting_an_engine(tiny_model, data, tmp_path, capsys):
    path, _ = data
    out = tmp_path / "out"
    base = ["eval", "--model", str(tiny_model), "--data", str(path), "-o", str(out)]
    assert cli.main(["eval", "--model", str(tmp_path / "no_model"), "--data", str(path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(base[:4] + [str(tmp_path / "missing.parquet")]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(base + ["--set", "rollout.temperature=-1"]) == 2
    assert "rollout.temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(base + ["--base-rate", "1.5"])
    assert not out.exists()


def test_score_forecasts_by_hand():
    qs = [Question(id="a", text="A?", market_prob=0.5, outcome=1), Question(id="b", text="B?", market_prob=0.2),
          Question(id="c", text="C?", outcome=0)]
    f = np.array([0.5, np.nan, 0.9])  # b: no parseable answer
    s = evaluate.score_forecasts(qs, f)
    assert s["questions"] == 3 and s["no_forecast"] == 1
    assert s["ce_market"] == pytest.approx((math.log(2) - 2 * math.log(0.01)) / 2)  # b pays the format penalty
    assert s["log_score"] == pytest.approx((math.log(0.5) + math.log(0.1)) / 2)
    assert s["brier"] == pytest.approx((0.25 + 0.81) / 2)
    assert s["ece"] == pytest.approx((0.5 + 0.9) / 2) and s["sharpness"] == pytest.approx(0.2)
    skip = evaluate.score_forecasts(qs, f, missing="skip")  # a baseline with nothing to say on b
    assert skip["questions"] == 2 and skip["market_questions"] == 1 and skip["ce_market"] == pytest.approx(math.log(2))
    mean, median, fail = evaluate.point_forecasts(np.array([[0.2, 0.4, np.nan, 0.9], [np.nan] * 4]))
    assert mean[0] == pytest.approx(0.5) and median[0] == pytest.approx(0.4) and fail.tolist() == [0.25, 1.0]
    assert np.isnan(mean[1]) and np.isnan(median[1])


def test_default_out_dir():
    from cluster.evaluate_cli import default_out_dir

    assert default_out_dir("runs/demo/checkpoints/step_000100") == Path("runs/demo/eval")
    assert default_out_dir("models/tiny") == Path("runs/eval/tiny")
