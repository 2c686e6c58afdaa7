"""The synthetic families: p* is right, and held-out questions are never training questions; and what a step draws
from them (`task.mix`, `task.outcome_noise`)."""

from fractions import Fraction

import numpy as np
import pytest

from rollout import synthetic
from rollout.config import TaskConfig
from rollout.task import QuestionSampler


@pytest.mark.parametrize("family", sorted(synthetic.FAMILIES))
def test_heldout_never_trained_on(family):
    train = {q.text for q in synthetic.questions([family], "train")}
    held = {q.text for q in synthetic.questions([family], "heldout")}
    assert train and held and not train & held


def test_heldout_of_a_mix_drops_what_another_family_trains_on():
    # dice holds out 4-, 8-, 10- and 12-sided dice, all of which dice_sizes trains on.
    mixed = synthetic.questions(["dice", "dice_sizes", "urn"], "heldout")
    train = {q.text for q in synthetic.questions(["dice", "dice_sizes", "urn"], "train")}
    assert mixed and not {q.text for q in mixed} & train
    assert {q.source for q in mixed} == {"synthetic/dice_sizes", "synthetic/urn"}
    assert len(mixed) == len(synthetic.questions(["dice_sizes", "urn"], "heldout"))


def test_dice_sizes_by_hand():
    qs = {q.id: q for q in synthetic.questions(["dice_sizes"], "all")}
    assert qs["dice_sizes/20/ge20"].p_true == pytest.approx(1 / 20)
    assert qs["dice_sizes/7/le3"].p_true == pytest.approx(3 / 7)
    assert qs["dice_sizes/7/le3"].text == ("A fair 7-sided die is rolled. What is the probability the result is at "
                                           "most 3?")
    sizes = {int(q.id.split("/")[1]) for q in synthetic.questions(["dice_sizes"], "train")}
    held = {int(q.id.split("/")[1]) for q in synthetic.questions(["dice_sizes"], "heldout")}
    # Held-out sizes lie between training sizes: the model can interpolate what n means, not guess it.
    assert min(sizes) < min(held) and max(held) < max(sizes) and not sizes & held
    # The six-sided questions are dice's, word for word.
    six = {q.text: q.p_true for q in synthetic.questions(["dice_sizes"], "train") if "/6/" in q.id}
    assert six == {q.text: q.p_true for q in synthetic.questions(["dice"], "train")}


def test_calc_by_hand():
    q = {q.id: q for q in synthetic.questions(["calc"], "train")}["calc/6/any2"]
    assert q.p_true == pytest.approx(float(1 - Fraction(25, 36)))


def test_unknown_family_and_split():
    with pytest.raises(ValueError, match="unknown synthetic families"):
        synthetic.questions(["dice", "tarot"])
    with pytest.raises(ValueError, match="split"):
        synthetic.questions(["dice"], "test")


def test_one_family_per_step():
    """mix one_family: every question of a step from one family, the family drawn per step; mixed: any of them."""
    fams = ["dice", "urn", "coin"]
    one = QuestionSampler(TaskConfig(families=fams, mix="one_family"), seed=0)
    mixed = QuestionSampler(TaskConfig(families=fams), seed=0)
    per_step = [{synthetic.family_of(i.question) for i in one.step(s, 16)} for s in range(30)]
    assert all(len(f) == 1 for f in per_step) and set().union(*per_step) == set(fams)
    assert all(len({synthetic.family_of(i.question) for i in mixed.step(s, 16)}) > 1 for s in range(30))


def test_outcome_noise_makes_a_noisy_market_around_p_star():
    """outcome_noise (reward market): each question instance is scored against p* plus its own normal noise of that
    std, kept in [0, 1], the same when the step is drawn again; without it, against p* itself."""
    noisy = TaskConfig(families=["dice"], outcome_noise=0.1)
    steps = [QuestionSampler(noisy, seed=0).step(s, 64) for s in range(20)]
    targets = np.array([i.target for st in steps for i in st])
    diffs = targets - np.array([i.question.p_true for st in steps for i in st])
    assert ((targets >= 0) & (targets <= 1)).all()
    assert abs(diffs.mean()) < 0.02 and 0.09 < diffs.std() < 0.11  # dice p* from 1/6 to 5/6: clipped hardly ever
    assert len(np.unique(targets[:64])) > 32  # per instance, not per question (6-sided dice: 10 questions)
    assert [i.target for i in QuestionSampler(noisy, seed=0).step(3, 64)] == [i.target for i in steps[3]]
    plain = QuestionSampler(TaskConfig(families=["dice"]), seed=0).step(3, 64)
    assert [i.target for i in plain] == [i.question.p_true for i in plain]
