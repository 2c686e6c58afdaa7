"""The end of a run with nothing to show, and questions too long to ask: said plainly, never a crash (no engine)."""

import json
import math

import numpy as np
import pyarrow.parquet as pq

from cluster import cli, report
from cluster.train import Driver, StopRequest, _step_line, print_summary
from learner.storage import RunStorage
from rollout import evaluate
from rollout.questions import Question
from rollout.trajectory import TrajectoryBuilder, rollout_stats
from tests.conftest import make_cfg

QS = [Question(id=f"q{i}", text=f"Q{i}?", p_true=p, market_prob=p) for i, p in enumerate([0.2, 0.5, 0.8])]


def _unparseable(questions, n=4):
    return evaluate.Samples(np.full((len(questions), n), np.nan), [["junk"] * n] * len(questions),
                            [["length"] * n] * len(questions), np.ones(len(questions), bool))


def test_plots_with_nothing_parseable_are_skipped_and_said(tmp_path, capsys):
    p = np.array([q.p_true for q in QS])
    assert report.plot_reliability({"model": (np.full(3, np.nan), p)}, tmp_path / "reliability.png") is None
    assert report.plot_learning_curve([], None, tmp_path / "learning_curve.png") is None
    skipped_steps = [{"step": s, "reward_mean": None, "sequences": 0} for s in range(3)]  # NaN, read back from JSON
    assert report.plot_learning_curve(skipped_steps, None, tmp_path / "learning_curve.png") is None
    err = capsys.readouterr().err
    assert "reliability.png: no parseable forecast with a target to compare it with; the plot is skipped" in err
    assert err.count("learning_curve.png: no step has a reward; the plot is skipped") == 2
    assert not list(tmp_path.iterdir())


def test_report_cli_exits_0_when_nothing_parsed(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward_mean": None}) + "\n" for s in range(2)))
    pq.write_table(evaluate.predictions_table(QS, _unparseable(QS)), run / "eval" / "predictions.parquet")
    assert cli.main(["report", str(run)]) == 0
    out = capsys.readouterr()
    assert "the plot is skipped" in out.err and "wrote" not in out.out


def test_run_end_with_nothing_parseable(tmp_path, capsys):
    """The driver's last lines: summary.json with null for NaN, no plot, and a summary that says n/a."""
    nothing = evaluate.summarize(QS, _unparseable(QS).forecasts)
    assert math.isnan(nothing["ce"]) and math.isnan(nothing["ce_minus_floor"]) and nothing["format_fail_rate"] == 1
    assert nothing["questions"] == 3 and nothing["skipped_too_long"] == 0
    text = json.dumps(evaluate.jsonable({"eval_after": {"train": nothing}, "x": [np.float32("nan"), np.int64(2)]}))
    assert "NaN" not in text and json.loads(text)["x"] == [None, 2]

    storage = RunStorage(tmp_path / "run")
    driver = Driver(make_cfg(tmp_path), storage, StopRequest())
    driver.final_forecasts = {"train": (np.full(3, np.nan), evaluate.truth(QS))}
    assert driver.plot({"reference_levels": None}, []) == []
    assert "the plot is skipped" in capsys.readouterr().err

    # eval_before as a resumed run reads it back from its checkpoint (NaN as null), eval_after as computed
    before = json.loads(json.dumps(evaluate.jsonable(nothing)))
    print_summary({"steps": 6, "stopped_early": False, "wall_s": 12.0, "run_dir": storage.uri, "plots": [],
                   "reference_levels": None, "eval_before": {"train": before}, "eval_after": {"train": nothing}})
    out = capsys.readouterr().out
    assert "CE-floor n/a -> n/a   format failures 100.0%" in out and "plots: none (nothing to draw)" in out


def test_questions_too_long_are_skipped_and_counted():
    qs = QS + [Question(id="long", text="Q?" * 500, p_true=0.5)]
    samples = evaluate.Samples(np.array([[0.3, 0.1], [np.nan] * 2, [0.5, 0.4], [np.nan] * 2]),
                               [["a", "b"], [], ["c", "d"], []], [["answer"] * 2, [], ["answer", "length"], []],
                               np.array([True, False, True, False]))
    asked, kept, skipped = samples.split(qs)
    assert [q.id for q in asked] == ["q0", "q2"] and skipped == ["q1", "long"] and kept.forecasts.shape == (2, 2)
    s = evaluate.summarize(asked, kept.forecasts, skipped=skipped)
    assert s["questions"] == 2 and s["samples"] == 4 and s["format_fail_rate"] == 0
    assert s["skipped_too_long"] == 2 and s["skipped_too_long_first"] == ["q1", "long"]
    scored = evaluate.score_forecasts(asked, evaluate.point_forecasts(kept.forecasts)[0], skipped=skipped)
    assert scored["questions"] == 2 and scored["skipped_too_long"] == 2
    none = evaluate.summarize([], np.zeros((0, 2)), skipped=[q.id for q in qs])  # every prompt too long
    assert none["questions"] == 0 and none["skipped_too_long"] == 4 and len(none["skipped_too_long_first"]) == 4
    assert math.isnan(none["skill"])
    table = evaluate.predictions_table(asked, kept).to_pylist()
    assert [r["texts"] for r in table] == [["a", "b"], ["c", "d"]] and table[1]["end_reasons"] == ["answer", "length"]


def test_progress_says_how_far_and_what_was_skipped(capsys):
    progress = evaluate.Progress("heldout", 12, 4, bar=True)
    part = evaluate.Samples(np.full((8, 4), 0.5), [["x"] * 4] * 8, [["answer"] * 4] * 8, np.array([True] * 7 + [False]))
    progress.update(part)
    progress.close(["q7", "q9", "q10", "q11", "q12", "q13"], 512)
    out = capsys.readouterr()
    assert "eval heldout" in out.err and "8/12" in out.err and "samples/s" in out.err  # the bar
    assert "eval heldout: 6 questions x 4 samples in" in out.out
    assert ("warning: eval heldout: 6 of 12 questions skipped: their prompts leave no room for an answer in "
            "rollout.max_model_len=512 (first: q7, q9, q10, q11, q12)") in out.out


def test_a_step_whose_trajectories_were_all_dropped():
    """Every prompt too long: the workers send empty batches; the learner's stats are counts, the step line says so."""
    empty = TrajectoryBuilder().build(tool_stats={"dropped_too_long": 64})
    m = rollout_stats(empty, None)
    assert m["sequences"] == 0 and m["dropped_too_long"] == 64 and "reward_mean" not in m
    m.update(step=3, policy_version=2, dropped_stale=0)
    assert _step_line(m) == ("step    3 v2    skipped: every trajectory was dropped (dropped_too_long 64), "
                             "nothing to train on")
