"""The warm start's beliefs: one opinion per question text, smooth in its numbers, unrelated to the truth."""

import numpy as np
import pytest

from model.tiny import TinyModelSpec, _belief
from rollout import synthetic


@pytest.mark.parametrize("belief_from", ["question", "numbers"])
def test_one_opinion_per_text_in_range(belief_from):
    spec = TinyModelSpec(belief_from=belief_from)
    qs = synthetic.questions(list(synthetic.FAMILIES), "all")
    b = {q.text: _belief(q.text, spec) for q in qs}
    assert all(0.05 <= v <= 0.95 for v in b.values())
    six = [q for q in synthetic.questions(["dice", "dice_sizes"], "train") if "6-sided" in q.text]
    assert len({q.id for q in six}) == 2 * len({q.text for q in six})  # same text under two families' ids
    assert _belief(six[0].text, spec) == b[six[0].text]


def test_numbers_beliefs_are_smooth_and_not_the_truth():
    spec = TinyModelSpec(belief_from="numbers")
    qs = synthetic.questions(["dice_sizes"], "all")
    at_most = {(int(q.id.split("/")[1]), int(q.id.split("le")[1])): _belief(q.text, spec) for q in qs if "/le" in q.id}
    # Neighbouring sizes of the same question differ by little more than the per-question jitter.
    jumps = [abs(at_most[(n, k)] - at_most[(n + 1, k)]) for (n, k) in at_most if (n + 1, k) in at_most]
    assert np.median(jumps) < 0.15
    b = np.array([_belief(q.text, spec) for q in qs])
    p = np.array([q.p_true for q in qs])
    assert abs(np.corrcoef(b, p)[0, 1]) < 0.3 and np.abs(b - p).mean() > 0.2


def test_page_beliefs_follow_the_page_but_not_what_it_implies():
    """After a tool-world page, the warm start's answer varies strongly with the page's number (the model must
    read it) and smoothly, but is unrelated to the probability the number implies."""
    from model.tiny import page_belief
    from rollout import tool_world

    spec = TinyModelSpec()
    wins = np.arange(1, tool_world.FACES)
    b = np.array([page_belief(int(k), spec) for k in wins])
    p = wins / tool_world.FACES
    assert b.max() - b.min() > 0.5 and np.abs(np.diff(b)).max() < 0.4
    assert abs(np.corrcoef(b, p)[0, 1]) < 0.3 and np.abs(b - p).mean() > 0.2
    assert all(0.05 <= v <= 0.95 for v in b)
