import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from cluster import cli, report
from rollout import evaluate
from rollout import questions as qio
from rollout.questions import Question
from rollout.scoring import reference_levels


def _samples(forecasts):
    """What a worker returns for these forecasts (every question asked, one text per sample)."""
    f = np.asarray(forecasts, dtype=float)
    return evaluate.Samples(f, [[f"<answer>{x}</answer>" for x in row] for row in f],
                            [["answer"] * f.shape[1]] * len(f), np.ones(len(f), bool))


def _assert_png_drawn(path):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[0] > 300 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # lines and text, not a blank canvas


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    levels = reference_levels([0.2, 0.5, 0.9])
    with (run / "metrics.jsonl").open("w") as f:
        for step in range(6):
            r = levels.random + (levels.floor - levels.random) * step / 6
            f.write(json.dumps({"step": step, "reward_mean": r, "expected_reward": r + 0.01, "ce_mean": -r,
                                "skill": levels.skill(r)}) + "\n")
        f.write('{"step": 6, "rew')  # a crash mid-line: the last line is skipped
    (run / "summary.json").write_text(json.dumps({"reference_levels": levels.as_dict()}))
    (run / "config.yaml").write_text("task:\n  reward: market\n")
    return run


def test_learning_curve_only_without_predictions(run_dir, capsys):
    assert len(report.read_metrics(run_dir / "metrics.jsonl")) == 6
    assert cli.main(["report", str(run_dir)]) == 0
    _assert_png_drawn(run_dir / "learning_curve.png")
    assert not (run_dir / "reliability.png").exists()
    assert "forecast-grpo eval" in capsys.readouterr().out  # says how to get the reliability diagram


def test_reliability_from_eval_predictions(run_dir):
    rng = np.random.default_rng(0)
    qs = [Question(id=f"q{i}", text=f"Q{i}?", market_prob=0.5, outcome=int(rng.random() < 0.3)) for i in range(40)]
    samples = rng.uniform(0, 1, size=(40, 4))
    samples[0] = np.nan  # a question without any parseable answer is left out of the diagram
    qio.write_table(evaluate.predictions_table(qs, _samples(samples)), run_dir / "eval" / "predictions.parquet")
    paths = report.report(run_dir)
    assert [p.name for p in paths] == ["learning_curve.png", "reliability.png"]
    for p in paths:
        _assert_png_drawn(p)


def test_reliability_targets():
    qs = [Question(id="a", text="A?", p_true=0.3, market_prob=0.4), Question(id="b", text="B?", market_prob=0.6)]
    table = evaluate.predictions_table(qs, _samples([[0.2, 0.4], [0.5, np.nan]]))
    q, y, label = report.reliability_data(table)
    assert q.tolist() == pytest.approx([0.3, 0.5])
    assert y.tolist() == pytest.approx([0.3, 0.6]) and "true probability" in label  # p*, else the market
    resolved = [Question(id="a", text="A?", market_prob=0.4, outcome=1), Question(id="b", text="B?", market_prob=0.6)]
    q, y, label = report.reliability_data(evaluate.predictions_table(resolved, _samples([[0.2], [0.5]])))
    assert y[0] == 1.0 and np.isnan(y[1]) and "observed" in label


def test_plot_functions_take_data(tmp_path):
    q = np.linspace(0.05, 0.95, 50)
    path = report.plot_reliability({"model": (q, (q > 0.5).astype(float)), "always 0.5": (np.full(50, 0.5), q)},
                                   tmp_path / "r.png")
    _assert_png_drawn(path)
    assert report.plot_reliability({"model": (q, np.full(50, np.nan))}, tmp_path / "empty.png") is None
    assert not (tmp_path / "empty.png").exists()  # nothing to draw: said, and skipped (tests/test_eval_robust.py)
    metrics = [{"step": s, "reward_mean": -1 + s / 10, "ce_mean": 1 - s / 10} for s in range(5)]
    _assert_png_drawn(report.plot_learning_curve(metrics, None, tmp_path / "lc.png", "outcome_brier"))


def test_report_errors(tmp_path, run_dir, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert cli.main(["report", str(run_dir), "--predictions", str(tmp_path / "missing.parquet")]) == 2
    assert not (run_dir / "learning_curve.png").exists()  # nothing half-done
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write("\n{}\n")  # the cut line is now in the middle: corrupt, not a crash at the end
    with pytest.raises(ValueError, match="metrics.jsonl:7: not JSON"):
        report.read_metrics(run_dir / "metrics.jsonl")


def test_rolling_mean_is_trailing_and_skips_nan():
    y = np.array([1.0, 3.0, np.nan, 5.0, 7.0])
    assert report._rolling(y, 2) == pytest.approx([1.0, 2.0, 3.0, 5.0, 6.0])
    assert report._rolling(y, 1) is y
