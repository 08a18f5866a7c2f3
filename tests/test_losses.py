"""engine.losses against hand-computed cases and brute-force Python loops."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from engine.losses import (lm_loss_from_logits, masked_mean, masked_var, masked_whiten,
                           ppo_policy_loss, ppo_ptx_objective, ptx_loss, ranking_accuracy,
                           ranking_loss, sft_loss, value_loss)


def _rand_mask(g, B, T, p=0.7):
    m = torch.rand(B, T, generator=g) < p
    m[0, 0] = True                       # never fully empty
    return m


# ----------------------------------------------------------------------------- masked stats

def test_masked_stats_match_selection():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    m = _rand_mask(g, 5, 7)
    sel = x[m]
    assert torch.allclose(masked_mean(x, m), sel.mean())
    assert torch.allclose(masked_var(x, m), sel.var(unbiased=True))
    assert torch.allclose(masked_var(x, m, unbiased=False), sel.var(unbiased=False))
    for b in range(5):
        row = x[b][m[b]]
        want = row.mean() if row.numel() else torch.tensor(0.0, dtype=x.dtype)
        assert torch.allclose(masked_mean(x, m, dim=1)[b], want)
        if row.numel() > 1:
            assert torch.allclose(masked_var(x, m, dim=1)[b], row.var(unbiased=True))
    w = masked_whiten(x, m)
    assert torch.allclose(w[m], (sel - sel.mean()) / torch.sqrt(sel.var() + 1e-8))
    assert torch.all(w[~m] == 0)
    assert torch.allclose(w[m].mean(), torch.tensor(0.0, dtype=x.dtype), atol=1e-12)
    assert torch.allclose(w[m].std(), torch.tensor(1.0, dtype=x.dtype), atol=1e-6)
    w2 = masked_whiten(x, m, shift_mean=False)
    assert torch.allclose(w2[m], (sel - sel.mean()) / torch.sqrt(sel.var() + 1e-8) + sel.mean())


def test_masked_stats_ignore_garbage_and_empty():
    x = torch.tensor([[1.0, float("nan"), 3.0], [float("inf"), 5.0, -float("inf")]])
    m = torch.tensor([[1, 0, 1], [0, 1, 0]])
    assert masked_mean(x, m).item() == pytest.approx(3.0)
    assert masked_var(x, m).item() == pytest.approx(((1 - 3) ** 2 + 0 + (5 - 3) ** 2) / 2)
    assert torch.isfinite(masked_whiten(x, m)).all()
    empty = torch.zeros(2, 3)
    assert masked_mean(x, empty).item() == 0.0
    assert masked_var(x, empty).item() == 0.0


def test_masked_mean_shape_error_names_tensor():
    with pytest.raises(ValueError, match="mask"):
        masked_mean(torch.zeros(2, 3), torch.ones(2, 4))


# ----------------------------------------------------------------------------- LM losses

def test_sft_loss_hand_case():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -float("inf"), -4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    # (1 + 2 + 3 + 4) / 4 tokens; the masked -9 and -inf are ignored
    assert sft_loss(logp, mask).item() == pytest.approx(2.5)
    assert ptx_loss(logp, mask).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="loss_mask"):
        sft_loss(logp, mask[:, :2])


def test_lm_loss_from_logits_matches_gather_and_torch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (3, 6), generator=g)
    targets[0, :2] = -100
    targets[2, 5] = -100
    got = lm_loss_from_logits(logits, targets)
    want = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100)
    assert torch.allclose(got, want)
    keep = targets != -100
    logp = logits.log_softmax(-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(got, sft_loss(logp, keep))
    # by hand for one token: uniform logits over V = 4 give log(4)
    assert lm_loss_from_logits(torch.zeros(1, 4), torch.tensor([2])).item() == pytest.approx(math.log(4))
    assert lm_loss_from_logits(torch.zeros(1, 4), torch.tensor([-100])).item() == 0.0
    with pytest.raises(ValueError, match="targets"):
        lm_loss_from_logits(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- ranking loss

def _ranking_loss_loop(rewards, ranking):
    """Explicit pair loop: the paper's loss with ties dropped and padding skipped."""
    per_prompt = []
    for b in range(rewards.shape[0]):
        terms = []
        K = rewards.shape[1]
        for i in range(K):
            for j in range(K):
                ri, rj = int(ranking[b, i]), int(ranking[b, j])
                if ri >= 0 and rj >= 0 and ri < rj:
                    terms.append(F.logsigmoid(rewards[b, i] - rewards[b, j]))
        if terms:
            per_prompt.append(-torch.stack(terms).mean())
    return torch.stack(per_prompt).mean()


def _ranking_accuracy_loop(rewards, ranking):
    good = n = 0
    for b in range(rewards.shape[0]):
        for i, j in itertools.permutations(range(rewards.shape[1]), 2):
            ri, rj = int(ranking[b, i]), int(ranking[b, j])
            if ri >= 0 and rj >= 0 and ri < rj:
                n += 1
                good += bool(rewards[b, i] > rewards[b, j])
    return good / max(n, 1), n


def _random_ranking(g, B, K):
    """Per prompt: a random number of real completions (>= 2), ranks with ties, -1 padding
    scattered at random positions."""
    ranking = torch.full((B, K), -1, dtype=torch.long)
    for b in range(B):
        k = int(torch.randint(2, K + 1, (1,), generator=g))
        pos = torch.randperm(K, generator=g)[:k]
        ranking[b, pos] = torch.randint(0, max(k - 1, 1), (k,), generator=g)  # fewer ranks -> ties
    return ranking


@pytest.mark.parametrize("K", range(2, 10))
def test_ranking_loss_matches_pair_loop_values_and_grads(K):
    g = torch.Generator().manual_seed(100 + K)
    B = 6
    ranking = _random_ranking(g, B, K)
    ranking[0, :2] = torch.tensor([0, 1])         # guarantee at least one pair in the batch
    rewards = torch.randn(B, K, generator=g, dtype=torch.float64, requires_grad=True)
    got = ranking_loss(rewards, ranking)
    want = _ranking_loss_loop(rewards, ranking)
    assert torch.allclose(got, want, atol=1e-12)
    (g_got,) = torch.autograd.grad(got, rewards)
    (g_want,) = torch.autograd.grad(want, rewards)
    assert torch.allclose(g_got, g_want, atol=1e-12)
    assert torch.all(g_got[ranking < 0] == 0)
    acc, n = ranking_accuracy(rewards, ranking)
    acc_want, n_want = _ranking_accuracy_loop(rewards, ranking)
    assert n == n_want and acc.item() == pytest.approx(acc_want)


def test_ranking_loss_hand_cases():
    # K = 2, one pair: -log sigmoid(2 - 0)
    r = torch.tensor([[2.0, 0.0]])
    assert ranking_loss(r, torch.tensor([[0, 1]])).item() == pytest.approx(-math.log(1 / (1 + math.exp(-2))))
    assert ranking_loss(r, torch.tensor([[1, 0]])).item() == pytest.approx(-math.log(1 / (1 + math.exp(2))))
    # K = 3 without ties: all C(3,2) = 3 pairs, divided by 3 (paper's 1/C(K,2))
    r = torch.tensor([[1.0, 0.0, -1.0]])
    ls = lambda d: -math.log(1 / (1 + math.exp(-d)))
    want = (ls(1.0) + ls(2.0) + ls(1.0)) / 3
    assert ranking_loss(r, torch.tensor([[0, 1, 2]])).item() == pytest.approx(want)
    # ties drop pairs: ranks [0, 0, 1] -> pairs (0,2) and (1,2) only
    want = (ls(2.0) + ls(1.0)) / 2
    assert ranking_loss(r, torch.tensor([[0, 0, 1]])).item() == pytest.approx(want)
    # a prompt whose completions are all tied adds no pair and is not counted in the mean
    r2 = torch.tensor([[1.0, 0.0, -1.0], [5.0, 3.0, 0.0]])
    assert ranking_loss(r2, torch.tensor([[0, 0, 1], [2, 2, 2]])).item() == pytest.approx(want)
    # no pair anywhere -> 0, still differentiable
    z = torch.zeros(1, 3, requires_grad=True)
    out = ranking_loss(z, torch.tensor([[0, 0, -1]]))
    out.backward()
    assert out.item() == 0.0 and torch.all(z.grad == 0)


def test_ranking_loss_padding_garbage_does_not_leak():
    r = torch.tensor([[1.0, float("nan"), 0.0, float("inf")]], requires_grad=True)
    ranking = torch.tensor([[0, -1, 1, -1]])
    loss = ranking_loss(r, ranking)
    loss.backward()
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1))))
    assert torch.isfinite(r.grad).all() and r.grad[0, 1] == 0 and r.grad[0, 3] == 0
    acc, n = ranking_accuracy(r.detach(), ranking)
    assert n == 1 and acc.item() == 1.0


def test_ranking_loss_errors():
    with pytest.raises(ValueError, match="ranking"):
        ranking_loss(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="ranking must be an integer"):
        ranking_loss(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="rewards must be 2-D"):
        ranking_loss(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="-1"):
        ranking_loss(torch.zeros(1, 3), torch.tensor([[0, -2, 1]]))


def test_ranking_accuracy_hand_case():
    r = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    ranking = torch.tensor([[0, 1, 2, -1]])
    # pairs (0,1) ok, (0,2) ok, (1,2) wrong: 2 of 3
    acc, n = ranking_accuracy(r, ranking)
    assert n == 3 and acc.item() == pytest.approx(2 / 3)
    # equal scores count as wrong
    acc, n = ranking_accuracy(torch.tensor([[1.0, 1.0]]), torch.tensor([[0, 1]]))
    assert n == 1 and acc.item() == 0.0


# ----------------------------------------------------------------------------- PPO losses

def test_ppo_policy_loss_hand_cases():
    clip = 0.2
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1, 9.0]])
    adv = torch.tensor([[2.0, -1.0, -1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    old = torch.zeros(1, 6)
    logp = ratio.log().requires_grad_(True)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip=clip)
    # token 0: A>0, ratio 1.5 -> clipped to 1.2: max(-3.0, -2.4) = -2.4 (clipped, no gradient)
    # token 1: A<0, ratio 0.5 -> clipped to 0.8: max(0.5, 0.8) = 0.8   (clipped, no gradient)
    # token 2: A<0, ratio 1.5 -> max(1.5, 1.2) = 1.5                   (unclipped, pessimistic)
    # token 3: A>0, ratio 0.5 -> max(-1.0, -1.6) = -1.0                (unclipped, pessimistic)
    # token 4: inside the range -> -3.3; token 5 is padding
    per_token = [-2.4, 0.8, 1.5, -1.0, -3.3]
    assert loss.item() == pytest.approx(sum(per_token) / 5)
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.5 + 0.5 + 1.1) / 5)
    k3 = [r - 1 - math.log(r) for r in (1.5, 0.5, 1.5, 0.5, 1.1)]
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 5)
    loss.backward()
    # d/dlogp of -A*ratio = -A*ratio / 5 on unclipped tokens, 0 on clipped tokens and padding
    want = torch.tensor([[0.0, 0.0, 1.5, -1.0, -3.3, 0.0]]) / 5
    assert torch.allclose(logp.grad, want, atol=1e-6)


def test_ppo_policy_loss_brute_force():
    g = torch.Generator().manual_seed(3)
    B, T = 4, 9
    logp = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = _rand_mask(g, B, T)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    terms, clipped = [], 0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                r = torch.exp(logp[b, t] - old[b, t])
                a = -adv[b, t] * r
                c = -adv[b, t].item() * min(max(r.item(), 0.8), 1.2)
                if a.item() >= c:        # unclipped term wins: gradient flows through r
                    terms.append(a)
                else:                    # clipped: a constant, no gradient
                    terms.append(torch.tensor(c, dtype=a.dtype))
                    clipped += 1
    want = torch.stack(terms).mean()
    assert torch.allclose(loss, want)
    assert stats["clipfrac"].item() == pytest.approx(clipped / len(terms))
    (g1,) = torch.autograd.grad(loss, logp)
    (g2,) = torch.autograd.grad(want, logp)
    assert torch.allclose(g1, g2)


def test_ppo_policy_loss_padding_and_errors():
    logp = torch.tensor([[0.0, 1000.0]], requires_grad=True)      # exp(1000) would be inf
    old = torch.tensor([[0.0, -1000.0]])
    adv = torch.tensor([[1.0, float("nan")]])
    loss, stats = ppo_policy_loss(logp, old, adv, torch.tensor([[1, 0]]))
    loss.backward()
    assert loss.item() == pytest.approx(-1.0) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in stats.values())
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(logp, old, torch.zeros(1, 3), torch.ones(1, 2))


def test_value_loss_hand_cases():
    # V_old = 0, clip 0.2
    v = torch.tensor([[0.5, 0.5, -0.1, 0.5]], requires_grad=True)
    old = torch.zeros(1, 4)
    ret = torch.tensor([[1.0, 0.0, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # token 0: V moved 0.5 toward R=1; clipped V = 0.2: max(0.25, 0.64) = 0.64 (clipped)
    # token 1: V moved 0.5 away from R=0; clipped V = 0.2: max(0.25, 0.04) = 0.25
    # token 2: inside the range: (-0.1 - 1)^2 = 1.21 both ways; token 3 padding
    want = 0.5 * (0.64 + 0.25 + 1.21) / 3
    loss = value_loss(v, old, ret, mask, clip=0.2)
    assert loss.item() == pytest.approx(want)
    loss.backward()
    # gradient 0 on the clipped token; (V - R) / 3 elsewhere
    assert torch.allclose(v.grad, torch.tensor([[0.0, 0.5, -1.1, 0.0]]) / 3)
    with pytest.raises(ValueError, match="returns"):
        value_loss(v, old, ret[:, :3], mask)


def test_value_loss_brute_force():
    g = torch.Generator().manual_seed(4)
    B, T = 3, 8
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    old = v + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ret = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = _rand_mask(g, B, T)
    terms = []
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                vc = min(max(v[b, t].item(), old[b, t].item() - 0.2), old[b, t].item() + 0.2)
                terms.append(max((v[b, t].item() - ret[b, t].item()) ** 2, (vc - ret[b, t].item()) ** 2))
    assert value_loss(v, old, ret, mask).item() == pytest.approx(0.5 * sum(terms) / len(terms))


def test_ptx_objective_equals_accumulated_gradients():
    """One backward of the sum == PPO backward then ptx backward into the same .grad (paper)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, generator=g, requires_grad=True)
    x_rl, x_pt = torch.randn(3, 4, generator=g), torch.randn(8, 4, generator=g)
    adv, mask = torch.randn(1, 3, generator=g), torch.ones(1, 3)
    old = (x_rl @ w).detach().unsqueeze(0)

    def terms():
        pl, _ = ppo_policy_loss((x_rl @ w).unsqueeze(0), old, adv, mask)
        nll = ptx_loss(-F.softplus(x_pt @ w).unsqueeze(0), torch.ones(1, 8))
        return pl, nll

    pl, nll = terms()
    obj = ppo_ptx_objective(pl, nll, 27.8)
    assert obj.item() == pytest.approx(pl.item() + 27.8 * nll.item())
    (g_sum,) = torch.autograd.grad(obj, w)
    pl, nll = terms()
    pl.backward()
    (27.8 * nll).backward()
    assert torch.allclose(w.grad, g_sum)
