"""Prompt-shared forward == plain full-sequence forward: same logprobs, same gradients."""

import numpy as np
import torch

from learner import forward, grpo
from rollout.trajectory import TrajectoryBuilder


def test_shared_prompt_forward_matches_full_sequences(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    rng = np.random.default_rng(0)
    b = TrajectoryBuilder()
    prompts = ["A fair 6-sided die is rolled. What is the probability the result is at least 4?",
               "An urn holds 3 red and 5 blue balls. One ball is drawn at random. What is the probability it is red?"]
    for g, text in enumerate(prompts):
        p = tok(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                        add_generation_prompt=True), add_special_tokens=False).input_ids
        for _ in range(3):  # completions of different lengths, with a masked (tool-like) span inside
            c = list(rng.integers(5, len(tok) - 10, size=int(rng.integers(3, 9))))
            mask = [1] * len(c)
            if len(c) > 4:
                mask[2] = 0
            b.add(p, c, mask, [-1.0] * len(c), rewards=0.0, group_ids=g, policy_version=0, forecasts=0.5,
                  targets=0.5, p_true=0.5, truncated=False, question_ids=str(g))
    batch = b.build()
    idx = np.array([0, 3, 1, 4, 2, 5])  # groups interleaved: the row -> prompt map must hold
    mb = forward.build(batch, idx, tok.pad_token_id, "cpu")
    assert mb.prompt_ids.shape[0] == 2 and mb.ids.shape[0] == 6

    logp, ent = forward.completion_logprobs(model, mb, temperature=0.7, entropy="nograd")
    (logp * mb.loss_mask).sum().backward()
    shared_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    total = 0.0
    for row, i in enumerate(idx):
        s = batch.sequence(int(i))
        ids = torch.from_numpy(batch.tokens[s].astype(np.int64))[None]
        logits = model(input_ids=ids).logits[:, :-1]
        lp, _ = grpo.token_logprobs(logits, ids[:, 1:], temperature=0.7)
        comp = lp[0, batch.prompt_lens[i] - 1:]
        n = len(comp)
        assert torch.allclose(comp, logp[row, :n], atol=1e-5), (row, comp, logp[row, :n])
        assert torch.all(mb.loss_mask[row, n:] == 0)
        total = total + (comp * mb.loss_mask[row, :n]).sum()
    total.backward()
    for n, p in model.named_parameters():
        # fp32 sums in another order: the tolerance scales with the gradient's largest entry
        scale = max(1.0, shared_grads[n].abs().max().item())
        assert torch.allclose(p.grad, shared_grads[n], atol=1e-5 * scale, rtol=1e-4), n
    assert ent.shape == logp.shape and torch.all(ent[mb.loss_mask > 0] > 0)


def test_gradient_checkpointing_gives_the_same_logprobs(tiny_model):
    """transformers turns the KV cache off under gradient checkpointing; the full-sequence path must agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    b = TrajectoryBuilder()
    p = tok("Two fair 6-sided dice are rolled. What is the probability their sum is at least 9?",
            add_special_tokens=False).input_ids
    for c in ([20, 21, 22], [23, 24, 25, 26, 27]):
        b.add(p, c, [1] * len(c), [-1.0] * len(c), rewards=0.0, group_ids=0, policy_version=0, forecasts=0.5,
              targets=0.5, p_true=0.5, truncated=False, question_ids="q")
    mb = forward.build(b.build(), np.array([0, 1]), tok.pad_token_id, "cpu")
    shared, _ = forward.completion_logprobs(model, mb, temperature=1.0)
    model.gradient_checkpointing_enable()
    model.train()
    full, _ = forward.completion_logprobs(model, mb, temperature=1.0)
    (full * mb.loss_mask).sum().backward()
    assert torch.allclose(shared * mb.loss_mask, full * mb.loss_mask, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
