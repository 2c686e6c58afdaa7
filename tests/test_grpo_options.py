"""The objective's options on the real Learner, in-process (DeepSpeed on gloo, world size 1, no Ray), each checked
where it acts: several updates per batch (the only path on which the PPO clip can act), the KL weight's schedule,
the entropy bonus, and the learning rate's warm-up and cosine decay."""

import math

import numpy as np
import pytest
import torch

from learner import grpo
from learner.learner import Learner
from rollout.trajectory import TrajectoryBatch, TrajectoryBuilder
from tests.conftest import make_cfg

PROMPT = ("A fair 6-sided die is rolled. What is the probability the result is at least {k}? "
          "Answer with <answer>p</answer>.")


def batch(tok, groups: list[list[tuple[str, float]]], version: int) -> TrajectoryBatch:
    """A group per question (each its own prompt), each sample its own answer text and reward."""
    b = TrajectoryBuilder()
    for g, samples in enumerate(groups):
        text = tok.apply_chat_template([{"role": "user", "content": PROMPT.format(k=2 + g)}], tokenize=False,
                                       add_generation_prompt=True)
        p = tok(text, add_special_tokens=False).input_ids
        for answer, reward in samples:
            c = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
            b.add(p, c, [1] * len(c), [-0.5] * len(c), rewards=reward, group_ids=g, policy_version=version,
                  forecasts=0.5, targets=0.5, p_true=0.5, truncated=False, question_ids=f"q{g}")
    return b.build()


def varied(tok, version: int, n_groups: int = 4) -> TrajectoryBatch:
    """Groups whose samples answer differently and score differently: every group carries a signal."""
    return batch(tok, [[(f"<answer>0.{(g + 2 * i) % 9 + 1}</answer>", -0.2 * ((g + i) % 4)) for i in range(4)]
                       for g in range(n_groups)], version)


def learner(model, *sets: str) -> Learner:
    return Learner(make_cfg(model, "learner.zero_stage=0", "sync.max_staleness=0", *sets).learner_job())


def spy_token_loss(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every micro-step's (learner logprobs, proximal logprobs) as they go into the loss."""
    seen, real = [], grpo.token_loss

    def spy(logp, logp_prox, *args, **kw):
        seen.append((logp.detach().clone(), logp_prox.detach().clone()))
        return real(logp, logp_prox, *args, **kw)

    monkeypatch.setattr(grpo, "token_loss", spy)
    return seen


def test_a_second_update_on_one_batch_is_clipped_against_the_logprobs_before_the_first(tiny_model, monkeypatch):
    """updates_per_batch 2: two mini-batches, two optimizer steps. The second mini-batch's ratio is to the logprobs
    the learner had before the batch's first update (not to its own detached logprobs, which makes the ratio 1 and
    the clip inert), so the first update moves it and a narrow clip acts on it."""
    lr = learner(tiny_model, "grpo.updates_per_batch=2", "grpo.clip_eps_low=0.01", "grpo.clip_eps_high=0.01",
                 "learner.lr=1e-3", "learner.micro_batch_size=8")
    b = varied(lr.tokenizer, 0)
    before = lr.sequence_logprobs(b)
    seen = spy_token_loss(monkeypatch)
    m = lr.train_step(b)
    assert m["optimizer_steps"] == 2 and m["trained_sequences"] == 16 and len(seen) == 2
    for (logp, prox), rows in zip(seen, (range(0, 8), range(8, 16))):
        for r, i in enumerate(rows):  # the proximal logprobs are those before any update, sequence by sequence
            s, n = b.offsets[i] + b.prompt_lens[i], b.offsets[i + 1] - b.offsets[i] - b.prompt_lens[i]
            assert prox[r, :n].numpy() == pytest.approx(before[s:s + n], abs=1e-5)
    (logp1, prox1), (logp2, prox2) = seen
    assert (logp1 - prox1).abs().max() < 1e-5  # the first mini-batch: nothing has moved yet
    assert (logp2 - prox2).abs().max() > 0.05  # the second: the first update moved it, well past the clip's band
    assert m["clip_frac"] > 0.02  # 0.09 here: a share of the second half's tokens
    lr.cfg.grpo.updates_per_batch = 1  # one update: the ratio is 1, and the clip never acts
    m = lr.train_step(varied(lr.tokenizer, 1))
    assert m["optimizer_steps"] == 1 and m["clip_frac"] == 0.0


def test_the_kl_weight_follows_its_schedule_from_zero(tiny_model):
    """kl_beta 0 rising to kl_beta_end over run.steps: the reference model is needed from the second step on, and a
    zero-variance group is kept for the KL term once its weight is above 0."""
    lr = learner(tiny_model, "grpo.kl_beta=0", "grpo.kl_beta_end=0.2", "run.steps=3", "learner.lr=1e-3")
    tok = lr.tokenizer
    flat = [[("<answer>0.5</answer>", -0.7)] * 4]  # a zero-variance group: nothing for the policy gradient
    ms = []
    for step in range(3):
        b = TrajectoryBatch.concat([varied(tok, step, n_groups=2), batch(tok, flat, step)])
        b.group_ids[-4:] = 99  # its own group
        ms.append(lr.train_step(b))
    assert [m["kl_beta"] for m in ms] == pytest.approx([0.0, 0.1, 0.2])
    assert ms[0]["kl"] == 0.0 and ms[1]["kl"] > 0 and ms[2]["kl"] > 0  # measured against the reference
    assert [m["trained_sequences"] for m in ms] == [8, 12, 12]


def test_the_entropy_bonus_alone_trains_and_raises_the_entropy(tiny_model):
    """With entropy_coef > 0 and nothing else to learn (every group's rewards equal), the groups are kept, the step
    updates, and the policy's entropy on those tokens goes up. The reported entropy is the model's, before it."""
    lr = learner(tiny_model, "grpo.entropy_coef=0.5", "learner.lr=1e-3")
    tok = lr.tokenizer
    b = batch(tok, [[(f"<answer>0.{g + i + 1}</answer>", -0.7) for i in range(4)] for g in range(3)], 0)

    @torch.no_grad()
    def mean_entropy() -> float:
        """The token entropy at every completion token, from a plain forward of each whole sequence."""
        ents = []
        for i in range(b.num_sequences):
            ids = torch.from_numpy(b.tokens[b.sequence(i)].astype(np.int64)).unsqueeze(0)
            logits = lr.engine.module(input_ids=ids).logits[0, b.prompt_lens[i] - 1:-1].float()
            ents.append(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1))
        return float(torch.cat(ents).mean())

    first = mean_entropy()
    m = lr.train_step(b)
    assert m["zero_var_groups"] == 3 and m["trained_sequences"] == 12 and m["grad_norm"] > 0
    assert m["entropy"] == pytest.approx(first, rel=1e-4)
    assert mean_entropy() > first + 1e-3


def test_warm_up_then_cosine_in_training_steps_whatever_the_updates_per_step(tiny_model, tmp_path):
    """lr_schedule cosine after warmup_steps, over run.steps training steps: every optimizer step of training step k
    runs at lr * f(k), with two updates per batch as with one, and the step's `lr` metric is that lr. A learner
    resumed from a checkpoint taken mid-schedule continues it, and its numbers, exactly."""
    base = 1e-3
    sets = [f"learner.lr={base}", "learner.warmup_steps=2", "learner.lr_schedule=cosine", "learner.min_lr_ratio=0.1",
            "run.steps=6", "grpo.updates_per_batch=2"]
    lr = Learner(make_cfg(tiny_model, "learner.zero_stage=0", *sets).learner_job(), run_dir=str(tmp_path))
    used, step = [], lr.engine.step

    def recording_step(*a, **kw):
        used.append(lr.engine.get_lr()[0])
        return step(*a, **kw)

    lr.engine.step = recording_step
    # by hand: warm-up (k + 1) / 2; then 0.1 + 0.9 * (1 + cos(pi t)) / 2, t = (k - 2) / (6 - 2)
    want = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55, 0.1 + 0.45 * (1 - math.cos(math.pi / 4))]
    ms = []
    for k in range(6):
        if k == 3:
            lr.save_checkpoint("checkpoints/step_000003")
        used.clear()
        ms.append(lr.train_step(varied(lr.tokenizer, k)))
        assert ms[-1]["optimizer_steps"] == 2
        assert used == pytest.approx([base * want[k]] * 2, rel=1e-6), k
        assert ms[-1]["lr"] == pytest.approx(base * want[k], rel=1e-6), k
    again = Learner(make_cfg(tiny_model, "learner.zero_stage=0", *sets).learner_job(), run_dir=str(tmp_path))
    assert again.load_checkpoint("checkpoints/step_000003") == 3
    for k in range(3, 6):
        m = again.train_step(varied(again.tokenizer, k))
        for key in ("lr", "loss", "grad_norm"):
            assert m[key] == pytest.approx(ms[k][key], rel=1e-6, abs=1e-9), (k, key)
