"""Our dice task is the TRL peer harness's task: same prompt text, same reward for the same completion, same
reference levels; and skill is 0 for the best constant forecaster and 1 for p* itself."""

import importlib.util
import random

import numpy as np
import pytest

from rollout import prompts, synthetic
from rollout.evaluate import summarize
from rollout.scoring import Scorer, reference_levels
from tests.conftest import SHARED


@pytest.fixture(scope="module")
def peer():
    path = SHARED / "peers" / "trl" / "task.py"
    if not path.is_file():
        pytest.skip(f"the TRL peer harness is not beside the project ({path})")
    spec = importlib.util.spec_from_file_location("peer_task", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_same_prompts_and_probabilities(peer):
    ours = {prompts.user_message(q): q.p_true for q in synthetic.questions(["dice"], "train")}
    theirs = {p["question"]: p["p_true"] for p in peer.all_problems((6,))}
    assert ours.keys() == theirs.keys()
    assert all(ours[k] == pytest.approx(theirs[k], abs=1e-12) for k in ours)
    held = {prompts.user_message(q) for q in synthetic.questions(["dice"], "heldout")}
    assert held == {p["question"] for p in peer.all_problems((4, 8, 10, 12))}


def test_same_reward_for_the_same_completion(peer):
    score = Scorer(mode="market", eps=0.01, strict=True)
    fixed = ["<answer>0.5</answer>", " <answer>5/6</answer>\n", "<answer>0.83</answer>", "<answer> 0.1 </answer>",
             "<answer>1</answer>", "<answer>0</answer>", "<answer>.7</answer>", "<answer>1.7</answer>", "0.5",
             "<answer>0.5</answer>0.5</answer", "<answer>3 / 4</answer>", "<answer>1/0</answer>", "",
             "<answer>0.5</answer><answer>0.6</answer>", "<answer>-0.2</answer>", "<answer>0.5.5</answer>"]
    rng = random.Random(0)
    alphabet = list("<answer>/0123456789. \n")
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(3000)]
    fuzz += [f"<answer>{rng.choice(['', ' '])}{rng.randint(0, 120) / 100}{rng.choice(['', ' '])}</answer>"
             for _ in range(500)]
    for text in fixed + fuzz:
        for p in (1 / 6, 0.5, 5 / 6):
            assert score(text, p)[0] == pytest.approx(peer.reward(text, p), abs=1e-12), (text, p)


def test_same_reference_levels(peer):
    ref = peer.reference_levels((6,))
    lv = reference_levels([q.p_true for q in synthetic.questions(["dice"], "train")], "market", 0.01)
    assert lv.floor == pytest.approx(ref["optimum"], abs=1e-12)
    assert lv.constant == pytest.approx(ref["constant_best"], abs=1e-12)
    assert lv.random == pytest.approx(ref["uniform_q"], abs=1e-12)
    assert (lv.floor, lv.constant, lv.random) == pytest.approx((-0.5735, -0.6931, -0.9776), abs=1e-4)


def test_skill_is_zero_for_the_best_constant_and_one_for_p_star():
    qs = synthetic.questions(["dice"], "train")
    p = np.array([q.p_true for q in qs])
    constant = summarize(qs, np.full((len(qs), 4), p.mean()))
    exact = summarize(qs, np.repeat(p[:, None], 4, axis=1))
    assert constant["skill"] == pytest.approx(0.0, abs=1e-12)
    assert exact["skill"] == pytest.approx(1.0, abs=1e-12)
    half = summarize(qs, np.repeat((p[:, None] + p.mean()) / 2, 4, axis=1))
    assert 0.0 < half["skill"] < 1.0
