"""The synthetic families: p* is right, and held-out questions are never training questions."""

from fractions import Fraction

import pytest

from rollout import synthetic


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
