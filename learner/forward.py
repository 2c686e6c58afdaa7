"""Logprobs of completion tokens, with each group's prompt computed once.

The G completions of a question share its prompt, and prompts are most of the tokens (a forecasting question with
background is hundreds of tokens; an answer is a few). So a micro-batch is run in two passes: the distinct prompts
(left-padded) fill a KV cache, the cache is repeated for each completion (`index_select`, which autograd follows),
and the completions run on top of it. Same values and gradients as forwarding every full sequence, with the prompt
work divided by G. Under gradient checkpointing (which turns the cache off) every row runs its whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from learner import grpo
from rollout.trajectory import TrajectoryBatch


@dataclass
class MicroBatch:
    prompt_ids: torch.Tensor  # [U, P] left-padded distinct prompts
    prompt_attn: torch.Tensor  # [U, P]
    row_prompt: torch.Tensor  # [N] which prompt each completion continues
    prompt_lens: torch.Tensor  # [N]
    ids: torch.Tensor  # [N, C] completion tokens, right-padded
    attn: torch.Tensor  # [N, C]
    loss_mask: torch.Tensor  # [N, C] float
    sampler_logprobs: torch.Tensor  # [N, C]
    rows: np.ndarray  # [N] sequence indices in the batch


def build(batch: TrajectoryBatch, idx: np.ndarray, pad_id: int, device) -> MicroBatch:
    starts, plens = batch.offsets[idx], batch.prompt_lens[idx]
    ends = batch.offsets[idx + 1]
    # distinct prompts: completions of one group share it (group ids are unique per question instance)
    groups, row_prompt = np.unique(batch.group_ids[idx], return_inverse=True)
    first = np.array([np.argmax(row_prompt == u) for u in range(len(groups))])
    P = int(plens.max())
    C = int((ends - starts - plens).max())
    n, u = len(idx), len(groups)
    prompt_ids = np.full((u, P), pad_id, dtype=np.int64)
    prompt_attn = np.zeros((u, P), dtype=np.int64)
    for k, r in enumerate(first):
        p = batch.tokens[starts[r]:starts[r] + plens[r]]
        prompt_ids[k, P - len(p):] = p
        prompt_attn[k, P - len(p):] = 1
    ids = np.full((n, C), pad_id, dtype=np.int64)
    attn = np.zeros((n, C), dtype=np.int64)
    mask = np.zeros((n, C), dtype=np.float32)
    slp = np.zeros((n, C), dtype=np.float32)
    for k in range(n):
        s, e = starts[k] + plens[k], ends[k]
        L = e - s
        ids[k, :L] = batch.tokens[s:e]
        attn[k, :L] = 1
        mask[k, :L] = batch.loss_mask[s:e]
        slp[k, :L] = batch.sampler_logprobs[s:e]
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return MicroBatch(t(prompt_ids), t(prompt_attn), t(row_prompt.astype(np.int64)), t(plens.astype(np.int64)),
                      t(ids), t(attn), t(mask), t(slp), np.asarray(idx))


def completion_logprobs(model, mb: MicroBatch, temperature: float, entropy: str = "none"):
    """[N, C] logprob of every completion token, and its entropy ('none', 'nograd' or 'grad')."""
    from transformers import DynamicCache

    if getattr(getattr(model, "module", model), "is_gradient_checkpointing", False):
        # transformers turns the KV cache off under gradient checkpointing: each row runs its prompt itself
        P = mb.prompt_ids.shape[1]
        attn = torch.cat([mb.prompt_attn[mb.row_prompt], mb.attn], dim=1)
        out = model(input_ids=torch.cat([mb.prompt_ids[mb.row_prompt], mb.ids], dim=1), attention_mask=attn,
                    position_ids=(attn.cumsum(-1) - 1).clamp(min=0))
        logits = out.logits[:, P - 1:-1]
    else:
        cache = DynamicCache()
        ppos = (mb.prompt_attn.cumsum(-1) - 1).clamp(min=0)
        prompt_out = model(input_ids=mb.prompt_ids, attention_mask=mb.prompt_attn, position_ids=ppos,
                           past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = prompt_out.past_key_values
        cache.reorder_cache(mb.row_prompt)  # one copy of its prompt's keys/values per completion
        C = mb.ids.shape[1]
        pos = mb.prompt_lens.unsqueeze(1) + torch.arange(C, device=mb.ids.device)
        out = model(input_ids=mb.ids, attention_mask=torch.cat([mb.prompt_attn[mb.row_prompt], mb.attn], dim=1),
                    position_ids=pos, past_key_values=cache, use_cache=True)
        # completion token 0 is predicted by the prompt's last position, token j by completion position j-1
        logits = torch.cat([prompt_out.logits[mb.row_prompt], out.logits[:, :-1]], dim=1)
    logp, logz = grpo.token_logprobs(logits, mb.ids, temperature)
    ent = None
    if entropy != "none":
        with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
            ent = grpo.token_entropy(logits, logz, temperature)
    return logp, ent
