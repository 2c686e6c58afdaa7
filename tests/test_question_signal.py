"""bench/question_signal.py, the reference a GRPO result on real questions is read against: forecasters fitted on the
training markets find a signal that carries to later questions, are caught out when the later questions shift, and
read a real model's Yes/No prior (SmolLM2-135M, a few seconds)."""

import datetime as dt
import importlib.util
import json

import numpy as np
import pytest

from rollout.questions import Question, read_parquet, write_parquet
from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("question_signal", ROOT / "bench" / "question_signal.py")
question_signal = importlib.util.module_from_spec(spec)
spec.loader.exec_module(question_signal)

CONFIG = str(ROOT / "cluster" / "configs" / "smollm2-forecastbench-cpu.yaml")


def _questions(n: int, start: dt.date, red: float, blue: float, seed: int) -> list[Question]:
    """Red-team questions at about `red`, blue-team ones at about `blue`; sources drawn at random (no signal)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        team, p = ("red", red) if i % 2 else ("blue", blue)
        out.append(Question(id=f"{start}/{i}", text=f"Will the {team} team win game {i + seed * 1000}?",
                            as_of=start + dt.timedelta(days=int(i) % 30), resolution_date=start + dt.timedelta(90),
                            market_prob=float(np.clip(p + rng.normal(0, 0.05), 0.01, 0.99)),
                            source=str(rng.choice(["manifold", "polymarket"]))))
    return out


def _run(tmp_path, train, heldout, *extra) -> dict:
    write_parquet(train, tmp_path / "train.parquet")
    write_parquet(heldout, tmp_path / "held.parquet")
    out = tmp_path / "signal.json"
    question_signal.main(["--config", CONFIG, "--set", f"task.data={tmp_path / 'train.parquet'}",
                          "--set", f"task.eval_data={tmp_path / 'held.parquet'}", "--json", str(out), *extra])
    return json.loads(out.read_text())


def test_a_signal_that_carries_is_found_and_a_shift_is_not_mistaken_for_one(tmp_path, capsys):
    train = _questions(200, dt.date(2025, 1, 1), red=0.8, blue=0.1, seed=0)
    same = _run(tmp_path, train, _questions(100, dt.date(2025, 6, 1), red=0.8, blue=0.1, seed=1),
                "--set", "run.eval_max_questions=32", "--within", "--write-within", str(tmp_path / "within"))["heldout"]
    words = same["words"]
    assert words["n"] == 100 and words["minus_constant"]["high"] < -0.1  # the team's colour carries
    assert words["subset_minus_constant"]["n"] == 32  # the recipe's fixed subset, reported beside all
    assert same["best constant"]["ce"] == pytest.approx(same["best constant"]["subset_ce"], abs=0.2)
    assert same["held-out mean (not learnable)"]["minus_constant"]["mean"] == pytest.approx(0, abs=0.01)
    printed = capsys.readouterr().out
    assert "within the training period" in printed and "| words |" in printed
    fit, rest = (read_parquet(tmp_path / "within" / f"{side}.parquet") for side in ("train", "eval"))
    assert (len(fit), len(rest)) == (160, 40) and {q.id for q in fit + rest} == {q.id for q in train}

    # Later, every question sits at 0.8 whatever its team: what was learned from the training markets misleads,
    # and only the held-out markets' own mean (which no learner knows) beats the constant.
    shifted = _run(tmp_path, train, _questions(100, dt.date(2025, 6, 1), red=0.8, blue=0.8, seed=1))["heldout"]
    assert shifted["words"]["minus_constant"]["low"] > 0
    assert shifted["held-out mean (not learnable)"]["minus_constant"]["high"] < 0


def test_no_held_out_questions_is_an_error_naming_the_keys(tmp_path):
    write_parquet(_questions(20, dt.date(2025, 1, 1), 0.8, 0.1, 0), tmp_path / "train.parquet")
    with pytest.raises(SystemExit, match=r"no held-out questions \(task.eval_data, or task.train_before\)"):
        question_signal.main(["--config", CONFIG, "--set", f"task.data={tmp_path / 'train.parquet'}",
                              "--set", "task.eval_data=[]"])


def test_a_real_models_prior_is_read_and_calibrated_on_the_training_markets(smollm2, tmp_path):
    train = _questions(12, dt.date(2025, 1, 1), red=0.8, blue=0.1, seed=0)
    held = _questions(6, dt.date(2025, 6, 1), red=0.8, blue=0.1, seed=1)
    logodds = question_signal.yes_no_logodds(str(smollm2), train + held)
    assert logodds.shape == (18,) and np.isfinite(logodds).all() and logodds.std() > 0  # read per question
    prior = dict(zip([q.id for q in train + held], logodds))
    forecast, extra = question_signal.prior_forecaster(prior, train)
    p = forecast(held)
    assert p.shape == (6,) and ((p > 0) & (p < 1)).all() and -1 <= extra["corr_train"] <= 1
    # Calibrated on the training markets: on average it answers near their mean, whatever the raw log-odds' scale.
    assert abs(forecast(train).mean() - np.mean([q.market_prob for q in train])) < 0.05
