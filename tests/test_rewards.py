"""Every reward formula against values worked out by hand (natural logs), the clipping, the format penalty, the
entropy floor and the reference levels of a small question mix."""

import math

import numpy as np
import pytest

from rollout import evaluate
from rollout.questions import Question
from rollout.scoring import (Scorer, brier_score, default_penalty, entropy, expected_reward, log_score, parse_answer,
                             reference_levels)

LN = {0.01: -4.605170186, 0.2: -1.609437912, 0.4: -0.916290732, 0.6: -0.510825624, 0.8: -0.223143551,
      0.99: -0.010050336}


@pytest.mark.parametrize("text,strict,want", [
    ("<answer>0.6</answer>", True, 0.6),
    ("  <answer> .25 </answer>\n", True, 0.25),
    ("<answer>3/4</answer>", True, 0.75),
    ("<answer>1</answer>", True, 1.0),
    ("<answer>1.5</answer>", True, None),       # not a probability
    ("<answer>2/0</answer>", True, None),       # division by zero
    ("I think <answer>0.6</answer>", True, None),  # strict: nothing may surround the tag
    ("I think <answer>0.1</answer> no, <answer>0.6</answer>", False, 0.6),  # the last tag counts
    ("<answer>sixty</answer>", False, None),
])
def test_parse_answer(text, strict, want):
    assert parse_answer(text, strict) == want


def test_market_reward_is_minus_cross_entropy():
    # p = 0.7, q = 0.6: 0.7 ln 0.6 + 0.3 ln 0.4 = 0.7(-0.510826) + 0.3(-0.916291) = -0.632465
    r, q = Scorer("market")("<answer>0.6</answer>", 0.7)
    assert q == 0.6
    assert r == pytest.approx(0.7 * LN[0.6] + 0.3 * LN[0.4], abs=1e-8)
    assert r == pytest.approx(-0.632465, abs=1e-6)


def test_minus_kl_is_reward_plus_entropy():
    # -KL(0.7 || 0.6) = -(0.7 ln(0.7/0.6) + 0.3 ln(0.3/0.4)) = -(0.107906 - 0.086305) = -0.021601
    r = float(log_score(0.7, 0.6))
    assert float(entropy(0.7)) == pytest.approx(0.610864, abs=1e-6)
    assert r + float(entropy(0.7)) == pytest.approx(-0.021601, abs=1e-6)
    assert float(log_score(0.7, 0.7)) + float(entropy(0.7)) == pytest.approx(0.0, abs=1e-12)


def test_outcome_log_and_brier():
    assert Scorer("outcome_log")("<answer>0.8</answer>", 1.0)[0] == pytest.approx(LN[0.8], abs=1e-8)
    assert Scorer("outcome_log")("<answer>0.8</answer>", 0.0)[0] == pytest.approx(LN[0.2], abs=1e-8)
    assert Scorer("outcome_brier")("<answer>0.3</answer>", 0.0)[0] == pytest.approx(-0.09)
    assert Scorer("outcome_brier")("<answer>0.3</answer>", 1.0)[0] == pytest.approx(-0.49)


def test_clipping():
    # q = 0 is scored as q = 0.01, q = 1 as 0.99
    assert float(log_score(0.5, 0.0)) == pytest.approx(0.5 * LN[0.01] + 0.5 * LN[0.99], abs=1e-8)
    assert float(log_score(1.0, 1.0)) == pytest.approx(LN[0.99], abs=1e-8)
    assert float(log_score(1.0, 0.0, eps=0.2)) == pytest.approx(LN[0.2], abs=1e-8)
    assert float(brier_score(1.0, 1.0)) == pytest.approx(-1e-4)
    assert Scorer("outcome_brier")("<answer>0</answer>", 0.0)[0] == pytest.approx(-1e-4)


def test_format_penalty_is_below_every_parseable_answer():
    assert default_penalty("market", 0.01) == pytest.approx(2 * LN[0.01])  # -9.21
    assert default_penalty("outcome_log", 0.01) == pytest.approx(-9.210340, abs=1e-6)
    assert default_penalty("outcome_brier", 0.01) == -1.0
    grid = np.linspace(0, 1, 101)
    for mode, score in (("market", log_score), ("outcome_log", log_score), ("outcome_brier", brier_score)):
        s = Scorer(mode)
        assert s("no answer", 0.5) == (s.format_penalty, None)
        worst = min(float(score(t, q)) for t in (0.0, 1.0) for q in grid)
        assert s.format_penalty < worst
    assert Scorer("market", penalty=-3.0)("<answer>x</answer>", 0.5) == (-3.0, None)


def test_entropy_floor():
    assert float(entropy(0.5)) == pytest.approx(math.log(2))
    assert float(entropy(0.0)) == 0.0 and float(entropy(1.0)) == 0.0
    # the best answer to p = 0.2 is 0.2 itself, and its reward is -H(0.2) = -0.500402
    grid = np.arange(1, 100) / 100
    rewards = log_score(0.2, grid)
    assert grid[np.argmax(rewards)] == pytest.approx(0.2)
    assert rewards.max() == pytest.approx(-0.500402, abs=1e-6)


MIX = [0.2, 0.5, 0.9]


def test_reference_levels_market_by_hand():
    lv = reference_levels(MIX, "market")
    # floor: -(H(0.2) + H(0.5) + H(0.9)) / 3 = -(0.500402 + 0.693147 + 0.325083) / 3
    assert lv.floor == pytest.approx(-0.506211, abs=1e-6)
    # best constant: mean p = 0.5333; its mean reward is -H(0.5333) (the log score is linear in p)
    assert lv.constant_answer == pytest.approx(0.533333, abs=1e-6)
    assert lv.constant == pytest.approx(-0.690923, abs=1e-6)
    # random: ln q and ln(1 - q) have the same mean over the grid, so the level is mean_q ln q whatever p is:
    # (ln 99! - 99 ln 100) / 99 = (359.134205 - 455.911848) / 99
    assert lv.random == pytest.approx(-0.977552, abs=1e-6)
    assert reference_levels([0.05, 0.3], "market").random == pytest.approx(-0.977552, abs=1e-6)
    assert lv.random < lv.constant < lv.floor


def test_reference_levels_brier_by_hand():
    lv = reference_levels(MIX, "outcome_brier")
    # floor: -mean p(1 - p) = -(0.16 + 0.25 + 0.09) / 3
    assert lv.floor == pytest.approx(-0.166667, abs=1e-6)
    # constant: -var(p) - mean p(1 - p); var = (0.3333^2 + 0.0333^2 + 0.3667^2) / 3 = 0.082222
    assert lv.constant == pytest.approx(-0.248889, abs=1e-6)
    # random: -(var of the grid 0.081667 + (0.5 - 0.5333)^2 + var(p)) - 0.166667
    assert lv.random == pytest.approx(-0.331667, abs=1e-6)


def test_outcome_log_levels_equal_market_levels():
    # under o ~ Bernoulli(p) the expected log score is the market formula
    assert reference_levels(MIX, "outcome_log") == reference_levels(MIX, "market")


@pytest.mark.parametrize("mode", ["market", "outcome_log", "outcome_brier"])
def test_skill_zero_at_best_constant_one_at_truth(mode):
    p = np.array(MIX)
    lv = reference_levels(p, mode)
    const = float(expected_reward(p, np.full(3, lv.constant_answer), mode).mean())
    best = float(expected_reward(p, p, mode).mean())
    assert lv.skill(const) == pytest.approx(0.0, abs=1e-12)
    assert lv.skill(best) == pytest.approx(1.0, abs=1e-12)
    assert lv.skill(lv.random) < 0


def test_skill_undefined_without_a_gap():
    assert math.isnan(reference_levels([0.3], "market").skill(-1.0))


@pytest.mark.parametrize("mode", ["market", "outcome_log", "outcome_brier"])
@pytest.mark.parametrize("q", [0.0, 0.3, 1.0])
def test_expected_reward_is_the_mean_sampled_reward(mode, q):
    # exact expectation over o ~ Bernoulli(p) of what Scorer pays, clipping included (q = 0 and 1 are clipped)
    p = 0.3
    s = Scorer("outcome_brier" if mode == "outcome_brier" else "outcome_log")
    text = f"<answer>{q}</answer>"
    want = p * s(text, 1.0)[0] + (1 - p) * s(text, 0.0)[0]
    assert float(expected_reward(p, q, mode)) == pytest.approx(want, abs=1e-12)


def test_expected_reward_penalises_unparseable():
    out = expected_reward(np.array([0.5, 0.5]), np.array([0.5, np.nan]), "market")
    assert out[0] == pytest.approx(-math.log(2))
    assert out[1] == pytest.approx(2 * LN[0.01])
    assert expected_reward(0.5, np.nan, "outcome_brier", penalty=-2.0) == -2.0


def test_summarize_by_hand():
    qs = [Question(id="a", text="a", p_true=0.2), Question(id="b", text="b", market_prob=0.8)]
    fc = np.array([[0.2, np.nan], [0.8, 0.8]])
    s = evaluate.summarize(qs, fc)
    # three answers at the entropy floor (-H(0.2) = -H(0.8) = -0.500402) and one format penalty
    assert s["reward"] == pytest.approx((3 * -0.500402 + 2 * LN[0.01]) / 4, abs=1e-6)
    assert s["format_fail_rate"] == 0.25
    assert s["ce"] == pytest.approx(0.500402, abs=1e-6)
    assert s["ce_minus_floor"] == pytest.approx(0.0, abs=1e-9)
    assert s["mean_abs_error"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="known probability"):
        evaluate.summarize([Question(id="c", text="c", outcome=1)], np.array([[0.5]]))
