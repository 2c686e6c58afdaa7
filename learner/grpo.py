"""GRPO's math, as pure functions of tensors (no model, no DeepSpeed): readable top to bottom, tested by hand values.

For a group of G completions of one question with rewards r_1..r_G:

    A_i = r_i - mean(r)                          (normalize_std=False: mean-centring only)
    A_i = (r_i - mean(r)) / (std(r) + 1e-6)      (normalize_std=True, DeepSeekMath; std is the unbiased one)

A group whose rewards are all equal has A = 0 everywhere: it carries no signal, is counted, and is left out of the
batch (it would only dilute the token mean), unless a KL or entropy term is on, which still has something to say.

Per token t of completion i, with the learner's logprob l, the proximal (pre-update) logprob l_prox, and the
logprob l_s under which the sampler actually drew the token:

    ratio  = exp(l - l_prox)
    pg     = -min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i)           (PPO, asymmetric clip)
    w      = min(exp(l_prox - l_s), tis_cap)       (truncated importance sampling: the sampler is not the learner;
                                                     it ran other kernels, other dtypes, maybe older weights)
    kl     = exp(l_ref - l) - (l_ref - l) - 1      (k3 estimator of KL(pi || pi_ref); only when beta > 0)
    loss_t = w * pg + beta * kl - entropy_coef * H_t

l_prox is the learner's own logprob before this batch's first update. With one optimizer step per batch it is
simply l detached (the ratio is 1, its gradient the policy gradient, and no extra forward pass is needed); with
several steps per batch it is computed once, without gradients, before the first.

Aggregation over a batch: token-mean (every completion token weighs the same; DAPO) or seq-mean (each completion's
token mean, then the mean over completions; the original GRPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STD_EPS = 1e-6


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, normalize_std: bool,
                     parsed: torch.Tensor | None = None):
    """Advantages per completion, and a mask of completions whose group has zero reward variance.

    With `parsed` (format-aware): the group's baseline and scale come from its parseable answers only, and an
    unparseable one gets the group's lowest advantage minus one scale unit, so one format slip no longer drags every
    other answer of its group up.
    """
    if parsed is not None:
        return _format_aware(rewards, group_ids, normalize_std, parsed)
    rewards = rewards.double()
    groups, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, inverse, rewards)
    mean = sums / counts
    centred = rewards - mean[inverse]
    sq = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, inverse, centred**2)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1))
    rmax = torch.full((len(groups),), -torch.inf, dtype=torch.float64).scatter_reduce(0, inverse, rewards, "amax")
    rmin = torch.full((len(groups),), torch.inf, dtype=torch.float64).scatter_reduce(0, inverse, rewards, "amin")
    zero_var = (rmax - rmin <= 1e-9)[inverse]
    adv = centred / (std[inverse] + STD_EPS) if normalize_std else centred
    adv = torch.where(zero_var, torch.zeros_like(adv), adv)
    return adv.float(), zero_var


def _format_aware(rewards, group_ids, normalize_std, parsed):
    adv = torch.zeros(len(rewards), dtype=torch.float64)
    zero_var = torch.zeros(len(rewards), dtype=torch.bool)
    for g in torch.unique(group_ids):
        idx = torch.nonzero(group_ids == g).squeeze(1)
        r, ok = rewards[idx].double(), parsed[idx]
        if r.max() - r.min() <= 1e-9:
            zero_var[idx] = True
            continue
        a = torch.zeros_like(r)
        scale = 1.0
        if ok.sum() >= 2:
            rp = r[ok]
            std = rp.std()
            a[ok] = (rp - rp.mean()) / (std + STD_EPS) if normalize_std else rp - rp.mean()
            scale = 1.0 if normalize_std else float(std)
        low = a[ok].min() if ok.any() else torch.tensor(0.0, dtype=torch.float64)
        a[~ok] = low - scale
        adv[idx] = a
    return adv.float(), zero_var


@dataclass
class TokenLoss:
    loss: torch.Tensor
    """Per-token loss, shape of the inputs (masked positions hold garbage; aggregate() ignores them)."""
    clipped: torch.Tensor
    """Per-token bool: the PPO clip removed this token's gradient."""
    is_weight: torch.Tensor
    kl: torch.Tensor


def token_loss(logp: torch.Tensor, logp_prox: torch.Tensor, logp_sampler: torch.Tensor, adv: torch.Tensor, *,
               eps_low: float, eps_high: float, tis_cap: float | None, logp_ref: torch.Tensor | None = None,
               kl_beta: float = 0.0, kl_weight: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
               entropy_coef: float = 0.0) -> TokenLoss:
    """All inputs [B, T] (adv and kl_weight may be [B, 1]); see the module docstring for the formulas.
    kl_weight scales the KL term per sequence (0 exempts a sequence from the anchor)."""
    adv = adv.expand_as(logp)
    ratio = torch.exp(logp - logp_prox)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    pg = -torch.minimum(unclipped, clipped)
    was_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
    if tis_cap is None:
        w = torch.ones_like(logp)
    else:
        w = torch.clamp(torch.exp(logp_prox - logp_sampler), max=tis_cap).detach()
    loss = w * pg
    kl = torch.zeros_like(logp)
    if kl_beta > 0.0:
        if logp_ref is None:
            raise ValueError("kl_beta > 0 needs the reference logprobs")
        d = logp_ref - logp
        kl = torch.exp(d) - d - 1.0
        loss = loss + kl_beta * (kl if kl_weight is None else kl * kl_weight)
    if entropy_coef > 0.0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs the token entropies")
        loss = loss - entropy_coef * entropy
    return TokenLoss(loss=loss, clipped=was_clipped, is_weight=w, kl=kl)


def aggregate(values: torch.Tensor, mask: torch.Tensor, how: str, denominator: float) -> torch.Tensor:
    """Sum of this micro-batch's share of the batch loss.

    token-mean: sum(values * mask) / denominator, denominator = completion tokens in the whole batch;
    seq-mean:   sum_i (sum_t values * mask / tokens_i) / denominator, denominator = completions in the batch.
    Summing this over micro-batches (and ranks) gives the batch mean exactly.
    """
    mask = mask.to(values.dtype)
    if how == "token-mean":
        return (values * mask).sum() / denominator
    if how == "seq-mean":
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / denominator
    raise ValueError(f"unknown loss aggregation {how!r}")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """log p(targets) under softmax(logits / T), and the per-token entropy (without gradient)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1) - logz
    return logp, logz


def token_entropy(logits: torch.Tensor, logz: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    p = torch.exp(logits - logz.unsqueeze(-1))
    return logz - (p * logits).sum(-1)
