"""The Learner as a plain class (DeepSpeed on gloo, world size 1, no Ray): what it trains on and what it drops."""

import numpy as np
import pytest

from learner.learner import Learner
from rollout.trajectory import TrajectoryBuilder
from tests.conftest import make_cfg


def _batch(tok, rewards_per_group, versions, answer="<answer>0.5</answer>"):
    prompt = tok.apply_chat_template([{"role": "user", "content": "A fair 6-sided die is rolled. What is the "
                                       "probability the result is at least 4? Answer with <answer>p</answer>."}],
                                     tokenize=False, add_generation_prompt=True)
    p = tok(prompt, add_special_tokens=False).input_ids
    c = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    b = TrajectoryBuilder()
    for g, (rewards, version) in enumerate(zip(rewards_per_group, versions)):
        for r in rewards:
            b.add(p, c, [1] * len(c), [-0.5] * len(c), rewards=r, group_ids=g, policy_version=version,
                  forecasts=0.5, targets=0.5, p_true=0.5, truncated=False, question_ids=f"q{g}")
    return b.build(), len(c)


@pytest.fixture(scope="module")
def learner(tiny_model):
    return Learner(make_cfg(tiny_model, "learner.zero_stage=0", "sync.max_staleness=1", "sync.every=2",
                            "learner.micro_batch_size=3").learner_job())


def test_drops_stale_and_zero_variance_groups(learner):
    learner.steps_done = 5
    batch, clen = _batch(learner.tokenizer, [[-1.0, -0.5, -0.2], [-0.7] * 3, [-1.0, -0.1, -0.3], [-0.9, -0.2, -0.4]],
                         versions=[5, 5, 4, 3])
    m = learner.train_step(batch)
    # group 1 has zero variance, group 3 is two steps old (bound 1): only groups 0 and 2 are trained on
    assert m["zero_var_groups"] == 1 and m["dropped_stale"] == 3 and m["trained_sequences"] == 6
    assert m["max_staleness_seen"] == 2 and m["optimizer_steps"] == 1
    assert learner.steps_done == 6
    assert m["grad_norm"] > 0


def test_a_step_with_nothing_to_learn_makes_no_update(learner):
    before = {n: p.detach().clone() for n, p in learner.engine.module.named_parameters()}
    batch, _ = _batch(learner.tokenizer, [[-0.7] * 4, [-0.2] * 4], versions=[learner.steps_done] * 2)
    m = learner.train_step(batch)
    assert m["trained_sequences"] == 0 and m["optimizer_steps"] == 0 and m["zero_var_groups"] == 2
    after = dict(learner.engine.module.named_parameters())
    assert all(np.array_equal(before[n].numpy(), after[n].detach().numpy()) for n in before)


def test_an_empty_batch_is_a_step_without_update(learner):
    """Every trajectory dropped before training (every prompt too long): no update, the step still counts."""
    step = learner.steps_done
    empty = TrajectoryBuilder().build(tool_stats={"dropped_too_long": 16})
    m = learner.train_step(empty, empty)  # one from each of two workers
    assert m["sequences"] == 0 and m["optimizer_steps"] == 0 and m["dropped_too_long"] == 32
    assert learner.steps_done == step + 1


def test_positive_advantage_raises_the_answers_logprob(learner):
    tok = learner.tokenizer
    same, _ = _batch(tok, [[-0.2, -0.2, -1.0, -1.0]], [learner.steps_done], answer="<answer>0.5</answer>")
    # the first two copies get A > 0, the last two A < 0: the same tokens, so the gradient cancels (only its rounding
    # is left, which Adam's sign-like first steps would still turn into a visible update: compare the norms)
    net_zero = learner.train_step(same)["grad_norm"]
    a, _ = _batch(tok, [[-0.2]], [learner.steps_done], answer="<answer>0.5</answer>")
    b, _ = _batch(tok, [[-1.0]], [learner.steps_done], answer="<answer>0.9</answer>")
    from rollout.trajectory import TrajectoryBatch

    both = TrajectoryBatch.concat([a, b])
    both.group_ids[:] = 0
    before = learner.sequence_logprobs(both)
    assert net_zero < 1e-3 * learner.train_step(both)["grad_norm"]
    after = learner.sequence_logprobs(both)
    s0, s1 = both.sequence(0), both.sequence(1)
    k = int(np.nonzero(both.tokens[s0] != both.tokens[s1])[0][0])
    good_d, bad_d = s0.start + k, s1.start + k  # the digit where the answers part
    # The better answer's digit gains on the worse one's. Each alone need not move its own way: Adam's first step
    # is sign-like, and pushing the worse digit down also moves the better one through the shared weights.
    assert after[good_d] - after[bad_d] > before[good_d] - before[bad_d] + 0.1
    assert after[bad_d] < before[bad_d]
