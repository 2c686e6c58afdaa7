"""Real questions with a held-out evaluation: its scores worked out by hand beside always 0.5, the best constant and
the market, with bootstrap intervals; conversations cut by their deadline dropped and named, never scored; evaluations
on the step lines of metrics.jsonl, in the learning curve and the summary; and the loop end to end on ForecastBench
questions held out by date (tiny model, ~60 s)."""

import json
import math
import os
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest

from cluster import cli, report
from cluster.train import MetricsLog, print_summary
from learner.storage import RunStorage
from rollout import evaluate
from rollout.multiturn import Conversation
from rollout.questions import Question
from rollout.task import Instance, scorer
from rollout.trajectory import TrajectoryBatch
from rollout.worker import RolloutWorker
from tests.conftest import ROOT, SHARED, make_cfg, needs_shared

FB = SHARED / "data" / "forecastbench"
LN2 = math.log(2)


def H(p):  # the market's entropy: its cross-entropy to itself, the floor
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_mean_interval():
    same = evaluate.mean_interval(np.array([0.2, 0.2, np.nan, 0.2]))
    assert same == {"mean": pytest.approx(0.2), "low": pytest.approx(0.2), "high": pytest.approx(0.2), "n": 3}
    x = np.random.default_rng(0).normal(0.1, 1.0, 400)
    ci = evaluate.mean_interval(x, seed=3)
    assert ci["low"] < x.mean() < ci["high"] and ci["n"] == 400 and ci == evaluate.mean_interval(x, seed=3)
    assert 0.15 < ci["high"] - ci["low"] < 0.25  # 2 x 1.96 / sqrt(400) = 0.196
    assert evaluate.mean_interval(np.array([np.nan]))["n"] == 0
    assert evaluate.interval_text(ci).count("[") == 1 and evaluate.interval_text({"mean": None, "low": None,
                                                                                  "high": None}) == "n/a [n/a, n/a]"


def test_fixed_subset():
    """The held-out questions every evaluation asks (the recipe's and bench/question_signal.py's): the same for a seed,
    distinct, in order, all of them where the cap does not bite."""
    picked = evaluate.fixed_subset(687, 128, seed=0)
    assert picked == evaluate.fixed_subset(687, 128, seed=0) != evaluate.fixed_subset(687, 128, seed=1)
    assert len(set(picked)) == 128 and picked == sorted(picked) and 0 <= picked[0] and picked[-1] < 687
    assert evaluate.fixed_subset(5, 8, seed=0) == evaluate.fixed_subset(5, None, seed=0) == [0, 1, 2, 3, 4]


QS = [Question(id="a", text="A?", market_prob=0.2, outcome=0), Question(id="b", text="B?", market_prob=0.6, outcome=1),
      Question(id="c", text="C?", market_prob=0.5), Question(id="d", text="D?", market_prob=0.9)]


def test_heldout_summary_by_hand():
    """Point forecasts: a 0.2 (two answers, a cut sample left out), b 0.5, c no parsed answer (the penalty), d every
    sample cut by its deadline (not scored). The best constant is the training questions' mean market, 0.3."""
    nan = np.nan
    samples = evaluate.Samples(np.array([[0.1, 0.3, nan], [0.5, 0.5, 0.5], [nan, nan, nan], [nan, nan, nan]]),
                               [["x"] * 3] * 4, [["answer", "answer", "deadline"], ["answer"] * 3,
                                                 ["length", "answer", "failed"], ["deadline"] * 3],
                               np.ones(4, bool))
    s = evaluate.heldout_summary(QS, samples, constant=0.3, boots=500)
    ce = [-(0.2 * math.log(0.2) + 0.8 * math.log(0.8)), -(0.6 * math.log(0.5) + 0.4 * math.log(0.5)),
          -2 * math.log(0.01)]
    const = [-(p * math.log(0.3) + (1 - p) * math.log(0.7)) for p in (0.2, 0.6, 0.5)]
    floor = [H(0.2), H(0.6), H(0.5)]
    assert (s["questions"], s["market_questions"], s["resolved_questions"], s["samples"]) == (3, 3, 2, 7)
    assert s["ce"] == pytest.approx(np.mean(ce)) and s["reward"] == pytest.approx(-np.mean(ce))
    assert s["ce_constant"] == pytest.approx(np.mean(const)) and s["ce_half"] == pytest.approx(LN2)
    assert s["ce_floor"] == pytest.approx(np.mean(floor))
    assert s["skill"] == pytest.approx((np.mean(const) - np.mean(ce)) / (np.mean(const) - np.mean(floor)))
    assert s["brier"] == pytest.approx((0.2 ** 2 + 0.5 ** 2) / 2)
    assert s["baselines"]["best constant"]["brier"] == pytest.approx((0.3 ** 2 + 0.7 ** 2) / 2)
    assert s["baselines"]["market"]["brier"] == pytest.approx((0.2 ** 2 + 0.4 ** 2) / 2)
    assert s["format_fail_rate"] == pytest.approx(2 / 7)  # of the answered samples: c's two (its third failed)
    assert s["dropped_samples"] == {"deadline": 4, "failed": 1} and s["dropped_questions"] == 1
    vs = s["vs"]["market"]["ce"]
    assert vs["mean"] == pytest.approx(np.mean(ce) - np.mean(floor)) and vs["n"] == 3 and vs["low"] <= vs["high"]
    assert s["vs"]["always 0.5"]["brier"]["mean"] == pytest.approx((0.2 ** 2 + 0.5 ** 2) / 2 - 0.25)
    assert s["vs"]["always 0.5"]["brier"]["n"] == 2
    assert evaluate.best_constant(QS)[0] == pytest.approx(0.55)  # the mean market, not the outcome frequency
    per_sample = evaluate.summarize(QS, samples.forecasts, ends=samples.ends)  # the synthetic sets' view: the same
    assert per_sample["samples"] == 7 and per_sample["format_fail_rate"] == pytest.approx(2 / 7)
    assert per_sample["dropped_samples"] == {"deadline": 4, "failed": 1}


def test_a_conversation_cut_by_its_deadline_is_dropped_counted_and_named(tiny_model):
    """No engine: the worker's scoring of conversations, fed three ends of one group."""
    cfg = make_cfg(tiny_model, "task.source=parquet", "task.data=x.parquet", "rollout.group_size=3")
    worker = RolloutWorker.__new__(RolloutWorker)  # the worker's state that scoring reads, without an engine
    worker.cfg, worker.scorer, worker.version, worker.load_seconds = cfg.rollout_job(), scorer(cfg.task), 2, 0.0
    inst = Instance(QS[0], 0.2, group_id=7)
    convs = [Conversation(inst, [1, 2], 0.0, ids=[3, 4], mask=[1, 1], logprobs=[-0.1, -0.2], turns=1,
                          final_text="<answer>0.3</answer>", end="answer"),
             Conversation(inst, [1, 2], 0.0, ids=[3], mask=[1], logprobs=[-0.1], turns=2, calls=1, end="deadline"),
             Conversation(inst, [1, 2], 0.0, end="failed", failure="RuntimeError: planted")]
    worker._converse = lambda instances, n: convs
    batch = worker._generate_conversations([inst], 0.0)
    assert batch.num_sequences == 1 and batch.end_reason.tolist() == ["answer"]
    assert batch.tool_stats["dropped_deadline"] == 1 and batch.tool_stats["dropped_failed"] == 1
    assert batch.dropped == [
        {"question_id": "a", "group_id": 7, "reason": "deadline",
         "detail": "cut by rollout.trajectory_timeout_s after 2 turns and 1 tool calls"},
        {"question_id": "a", "group_id": 7, "reason": "failed", "detail": "RuntimeError: planted"}]
    back = TrajectoryBatch.from_arrow(batch.to_arrow())  # the trajectory file keeps them in its metadata
    assert back.dropped == batch.dropped and TrajectoryBatch.concat([batch, back]).dropped == batch.dropped * 2


def test_evaluations_ride_on_the_step_lines(tmp_path):
    storage = RunStorage(tmp_path / "run")
    log = MetricsLog(storage, 0)
    log.add_evals([{"set": "heldout", "steps": 0, "ce": 0.7}])  # before the first step: on the first line
    log.write({"step": 0, "reward_mean": -1.0})
    log.write({"step": 1, "reward_mean": -0.9})
    log.add_evals([{"set": "heldout", "steps": 2, "ce": 0.6}])  # after step 1: on its line
    log.write({"step": 2, "reward_mean": -0.8})  # appends to the rewritten file
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [[e["steps"] for e in r.get("evals", [])] for r in rows] == [[0], [2], []]
    assert MetricsLog(storage, 2).rows() == rows[:2]  # a run resumed at step 2 keeps them
    fig, ax = plt.subplots()
    report._plot_evals(ax, [e for r in rows for e in r.get("evals", [])] + [
        {"set": "heldout", "steps": 3, "ce": 0.5, "ce_constant": 0.6, "ce_floor": 0.4}])
    assert [line.get_label() for line in ax.lines] == ["eval heldout: CE", "eval heldout: best constant 0.600",
                                                       "eval heldout: market floor 0.400"]
    plt.close(fig)


def test_the_summary_says_n_and_the_intervals(capsys):
    samples = evaluate.Samples(np.full((4, 2), 0.4), [["x"] * 2] * 4, [["answer"] * 2] * 4, np.ones(4, bool))
    s = evaluate.heldout_summary(QS, samples, constant=0.3)
    print_summary({"steps": 3, "stopped_early": False, "wall_s": 9.0, "run_dir": "runs/x", "plots": [],
                   "reference_levels": None, "eval_before": {"heldout": s}, "eval_after": {"heldout": s}})
    out = capsys.readouterr().out
    assert "n: 4 questions, 4 with a market, 2 resolved; 8 samples answered" in out
    assert "best constant (0.300, the training questions' mean market)" in out
    for name in ("always 0.5", "best constant", "market"):
        d = s["vs"][name]
        assert (f"after, minus {name + ':':14s} CE {evaluate.interval_text(d['ce'])} (n 4)   Brier "
                f"{evaluate.interval_text(d['brier'])} (n 2)") in out


@pytest.mark.e2e
@needs_shared(FB)
def test_real_questions_train_with_a_held_out_evaluation(tmp_path, tiny_model):
    """The CPU recipe's config on two ForecastBench sets, split by date as the README does, the tiny model for
    SmolLM2: a held-out evaluation before, after each step and at the end, on the step lines and in the summary."""
    data = tmp_path / "fb.parquet"
    assert cli.main(["data", "import", "forecastbench", *(str(FB / f) for f in (
        "2025-10-26-llm.json", "2025-10-26_resolution_set.json", "2026-03-01-llm.json",
        "2026-03-01_resolution_set.json")), "-o", str(data)]) == 0
    train, held = tmp_path / "train.parquet", tmp_path / "eval.parquet"
    assert cli.main(["data", "split", str(data), "--cutoff", "2026-02-01", "--train", str(train),
                     "--eval", str(held)]) == 0
    sets = [f"model.path={tiny_model}", "warmstart.base=null", f"task.data={train}", f"task.eval_data={held}",
            f"run.out_dir={tmp_path}", "run.name=fb", "run.steps=2", "run.eval_every=1", "run.eval_samples=2",
            "run.eval_max_questions=6", "run.eval_batch_questions=3", "run.progress=false",
            "rollout.prompts_per_step=4", "rollout.max_model_len=2048", "run.trajectories_every=0"]
    res = subprocess.run([sys.executable, "-m", "cluster.train", "--config",
                          str(ROOT / "cluster/configs/smollm2-forecastbench-cpu.yaml"),
                          *[a for s in sets for a in ("--set", s)]], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "RAY_ADDRESS": ""}, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    # the markets of each set; 17 of the later set's were asked in the earlier one already: kept there only
    assert "250 to train on (of 1227), 233 held out (of 954)" in res.stdout
    rows = [json.loads(ln) for ln in (tmp_path / "fb" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    evals = [e for r in rows for e in r.get("evals", [])]
    assert [(e["set"], e["steps"]) for e in evals] == [("heldout", 0), ("heldout", 1), ("heldout", 2)]
    assert all(e["ce_floor"] < e["ce_constant"] < e["ce_half"] for e in evals)
    summary = json.loads((tmp_path / "fb" / "summary.json").read_text())
    after = summary["eval_after"]["heldout"]
    n = after["questions"]  # of the 6, those whose prompts fit rollout.max_model_len; the others are counted
    assert n + after["skipped_too_long"] == 6 and summary["eval_before"]["heldout"]["questions"] == n > 0
    assert after["vs"]["best constant"]["ce"]["n"] == n and 0.2 < after["constant"] < 0.4
    assert "after, minus best constant:" in res.stdout and f"eval heldout: {n} questions x 2 samples" in res.stdout
    assert (tmp_path / "fb" / "learning_curve.png").is_file()
