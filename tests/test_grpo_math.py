"""GRPO's math against values worked out by hand."""

import math

import pytest
import torch

from learner import grpo


def test_advantages_mean_centred_without_std():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0, 0.0, 4.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    adv, zero = grpo.group_advantages(r, g, normalize_std=False)
    assert adv.tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -2.0, 2.0])
    assert zero.tolist() == [False, False, False, True, True, True, False, False]


def test_advantages_divided_by_unbiased_group_std():
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0])
    g = torch.tensor([7, 7, 7, 3, 3])
    adv, _ = grpo.group_advantages(r, g, normalize_std=True)
    # group 7: std = 1 (unbiased); group 3: mean 2, std = sqrt((4 + 4) / 1) = 2.828427
    s = math.sqrt(8.0)
    assert adv.tolist() == pytest.approx([-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6), -2 / (s + 1e-6), 2 / (s + 1e-6)],
                                         rel=1e-6)


def test_zero_variance_group_gets_zero_advantage_even_with_std():
    r = torch.tensor([-0.5, -0.5, -0.5, -0.5])
    adv, zero = grpo.group_advantages(r, torch.zeros(4, dtype=torch.long), normalize_std=True)
    assert adv.abs().max().item() == 0.0 and bool(zero.all())


def _loss(ratio, adv, eps_low=0.2, eps_high=0.3, tis_cap=None, sampler_shift=0.0, **kw):
    logp = torch.log(torch.tensor([[ratio]])).requires_grad_(True)
    prox = torch.zeros(1, 1)
    sampler = prox - sampler_shift
    out = grpo.token_loss(logp, prox, sampler, torch.tensor([[adv]]), eps_low=eps_low, eps_high=eps_high,
                          tis_cap=tis_cap, **kw)
    out.loss.sum().backward()
    return out, logp.grad.item()


@pytest.mark.parametrize("ratio,adv,loss,clipped,grad", [
    (1.0, 2.0, -2.0, False, -2.0),      # on-policy: -A, gradient -A * ratio
    (1.5, 2.0, -2.6, True, 0.0),        # above 1 + eps_high with A > 0: clipped at 1.3, no gradient
    (1.2, 2.0, -2.4, False, -2.4),      # inside the band
    (0.5, 2.0, -1.0, False, -1.0),      # below the band but A > 0: min() keeps the unclipped term
    (0.5, -2.0, 1.6, True, 0.0),        # below 1 - eps_low with A < 0: clipped at 0.8, no gradient
    (1.5, -2.0, 3.0, False, 3.0),       # above the band with A < 0: the unclipped (worse) term stays
])
def test_ppo_clip_both_sides(ratio, adv, loss, clipped, grad):
    out, g = _loss(ratio, adv)
    assert out.loss.item() == pytest.approx(loss, rel=1e-6)
    assert bool(out.clipped.item()) is clipped
    assert g == pytest.approx(grad, rel=1e-5)


def test_truncated_importance_weight():
    # learner says log 0 = 0, sampler said -log 4: weight 4, capped at 2; the weight carries no gradient
    out, g = _loss(1.0, 1.0, tis_cap=2.0, sampler_shift=math.log(4.0))
    assert out.is_weight.item() == pytest.approx(2.0)
    assert out.loss.item() == pytest.approx(-2.0)
    assert g == pytest.approx(-2.0)
    out, _ = _loss(1.0, 1.0, tis_cap=2.0, sampler_shift=math.log(1.5))
    assert out.is_weight.item() == pytest.approx(1.5)
    out, _ = _loss(1.0, 1.0, tis_cap=None, sampler_shift=math.log(4.0))
    assert out.is_weight.item() == 1.0


def test_k3_kl():
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.2)]])
    out = grpo.token_loss(logp, logp, logp, torch.zeros(1, 1), eps_low=0.2, eps_high=0.2, tis_cap=None,
                          logp_ref=ref, kl_beta=0.1)
    d = math.log(0.25) - math.log(0.5)  # ref - logp
    k3 = math.exp(d) - d - 1  # 0.5 + log 2 - 1 = 0.193147
    assert out.kl[0, 0].item() == pytest.approx(k3, rel=1e-6)
    assert out.kl[0, 1].item() == pytest.approx(0.0, abs=1e-7)
    assert out.loss[0, 0].item() == pytest.approx(0.1 * k3, rel=1e-5)
    with pytest.raises(ValueError):
        grpo.token_loss(logp, logp, logp, torch.zeros(1, 1), eps_low=0.2, eps_high=0.2, tis_cap=None, kl_beta=0.1)


def test_kl_weight_exempts_a_sequence_from_the_anchor():
    logp = torch.tensor([[math.log(0.5)], [math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.9)], [math.log(0.9)]])
    out = grpo.token_loss(logp, logp.detach(), logp.detach(), torch.zeros(2, 1), eps_low=0.2, eps_high=0.2,
                          tis_cap=None, logp_ref=ref, kl_beta=0.1, kl_weight=torch.tensor([[1.0], [0.0]]))
    out.loss.sum().backward()
    d = math.log(0.9) - math.log(0.5)
    assert out.loss[0, 0].item() == pytest.approx(0.1 * (math.exp(d) - d - 1), rel=1e-5)
    assert out.loss[1, 0].item() == 0.0 and logp.grad[1, 0].item() == 0.0
    # k3's gradient on a token the policy made rarer than the reference pushes it back up (negative d loss/d logp)
    assert logp.grad[0, 0].item() == pytest.approx(0.1 * (1 - math.exp(d)), rel=1e-5) and logp.grad[0, 0] < 0


def test_aggregation_token_mean_and_seq_mean_with_masks():
    values = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # token-mean: (1+2+3+4+5) / 5 tokens
    assert grpo.aggregate(values, mask, "token-mean", 5.0).item() == pytest.approx(3.0)
    # seq-mean: (mean(1,2,3) + mean(4,5)) / 2 sequences = (2 + 4.5) / 2
    assert grpo.aggregate(values, mask, "seq-mean", 2.0).item() == pytest.approx(3.25)
    # micro-batches sum to the batch value when given the batch denominator
    parts = sum(grpo.aggregate(values[i:i + 1], mask[i:i + 1], "token-mean", 5.0) for i in range(2))
    assert parts.item() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        grpo.aggregate(values, mask, "sum", 1.0)


def test_token_logprobs_with_temperature_and_entropy():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    target = torch.tensor([[0]])
    lp, logz = grpo.token_logprobs(logits, target, temperature=2.0)
    z = math.exp(1.0) + 1.0 + math.exp(-0.5)
    assert lp.item() == pytest.approx(1.0 - math.log(z), rel=1e-6)
    ps = [math.exp(1.0) / z, 1.0 / z, math.exp(-0.5) / z]
    ent = grpo.token_entropy(logits, logz, temperature=2.0)
    assert ent.item() == pytest.approx(-sum(p * math.log(p) for p in ps), rel=1e-6)


def test_format_aware_advantages():
    r = torch.tensor([-0.5, -0.7, -9.21, -0.6, -1.0, -1.0, -9.21, -9.21])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    parsed = torch.tensor([True, True, False, True, True, True, False, False])
    adv, zero = grpo.group_advantages(r, g, normalize_std=True, parsed=parsed)
    # group 0: parsed rewards -0.5, -0.7, -0.6: mean -0.6, unbiased std 0.1 -> +1, -1, 0; the failure: min - 1 = -2
    assert adv[:4].tolist() == pytest.approx([1.0, -1.0, -2.0, 0.0], abs=1e-4)
    # group 1: the two parsed answers tie (advantage 0); the failures sit one unit below
    assert adv[4:].tolist() == pytest.approx([0.0, 0.0, -1.0, -1.0], abs=1e-6)
    assert not zero.any()
    adv, _ = grpo.group_advantages(r, g, normalize_std=False, parsed=parsed)
    # without std: centred on the parsed mean, failures at min - std of the parsed rewards
    assert adv[:4].tolist() == pytest.approx([0.1, -0.1, -0.2, 0.0], abs=1e-6)
    _, zero = grpo.group_advantages(torch.full((4,), -9.21), torch.zeros(4, dtype=torch.long), True,
                                    torch.zeros(4, dtype=torch.bool))
    assert zero.all()


def _drift(markets: torch.Tensor, c: float, normalize_std: bool, spread: float = 0.03, group: int = 8) -> float:
    """E[A * d log pi / dc] for a policy answering c + spread * eps on every question, rewarded -CE(market, answer):
    the direction GRPO moves a constant answer."""
    eps = torch.randn(2000, len(markets), group, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = (c + spread * eps).clamp(1e-3, 1 - 1e-3)
    p = markets[None, :, None]
    rewards = p * q.log() + (1 - p) * (1 - q).log()
    ids = torch.arange(eps.shape[0] * len(markets)).repeat_interleave(group)
    adv, _ = grpo.group_advantages(rewards.reshape(-1), ids, normalize_std)
    return (adv.double().reshape(q.shape) * eps).mean().item() / spread


def test_std_normalisation_moves_a_constant_answer_to_the_markets_median_not_their_mean():
    """Nine markets at 0.02 and one at 0.9 (mean 0.108, median 0.02), like ForecastBench's (mean 0.24, median 0.105).
    Mean-centred advantages follow the cross entropy's gradient: a constant answer settles between 0.06 and 0.14,
    at the mean. Divided by each group's std, every question pushes alike whatever is at stake, and the answer keeps
    falling below 0.06, toward the median (bench/README.md, "Real questions, held out")."""
    markets = torch.tensor([0.02] * 9 + [0.9], dtype=torch.float64)
    assert _drift(markets, 0.06, normalize_std=False) > 0 > _drift(markets, 0.14, normalize_std=False)
    assert _drift(markets, 0.06, normalize_std=True) < 0 and _drift(markets, 0.108, normalize_std=True) < 0
