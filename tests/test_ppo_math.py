"""engine.ppo against hand-computed cases, brute-force loops and Monte Carlo."""
import importlib
import math

import pytest
import torch

from engine.losses import masked_whiten
from engine.ppo import (AdaptiveKLController, FixedKLController, PPOConfig, RunningMoments,
                        compute_advantages, ema_update, kl_estimate, loo_center, minibatch_indices,
                        shaped_rewards)


# ----------------------------------------------------------------------------- KL estimators

def test_kl_estimate_hand_values():
    logp = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.25), math.log(0.4)])
    # k1 = log(p / q); k2 = 0.5 log(p / q)^2; k3 = q/p - 1 - log(q/p)
    assert torch.allclose(kl_estimate(logp, ref, "k1"), torch.tensor([math.log(2), -math.log(2)]))
    assert torch.allclose(kl_estimate(logp, ref, "k2"), 0.5 * torch.tensor([math.log(2) ** 2] * 2))
    assert torch.allclose(kl_estimate(logp, ref, "k3"),
                          torch.tensor([0.5 - 1 + math.log(2), 2 - 1 - math.log(2)]))
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, "k4")
    with pytest.raises(ValueError, match="ref_logp"):
        kl_estimate(logp, ref[:1], "k1")


def test_kl_estimators_unbiased_on_categorical():
    """Exact expectations under pi and a Monte Carlo mean both recover KL(pi || pi_ref)."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    exact = (p * (p.log() - q.log())).sum()
    lp, lq = p.log(), q.log()
    # exact expectation sum_x p(x) k(x): k1 and k3 are unbiased, k2 is not
    for kind in ("k1", "k3"):
        assert torch.allclose((p * kl_estimate(lp, lq, kind)).sum(), exact, atol=1e-12)
    assert not torch.allclose((p * kl_estimate(lp, lq, "k2")).sum(), exact, atol=1e-3)
    # Monte Carlo with samples from pi: within 5 standard errors of the exact KL
    x = torch.multinomial(p, 100_000, replacement=True, generator=g)
    for kind in ("k1", "k3"):
        k = kl_estimate(lp[x], lq[x], kind)
        se = k.std() / math.sqrt(k.numel())
        assert abs(k.mean() - exact) < 5 * se
    k1, k3 = kl_estimate(lp[x], lq[x], "k1"), kl_estimate(lp[x], lq[x], "k3")
    assert (k1 < 0).any()                   # k1 is negative on some samples ...
    assert (k3 >= 0).all()                  # ... k3 never is
    assert k3.var() < k1.var()              # and k3 has the lower variance here


def test_k3_nonnegative_extremes():
    d = torch.tensor([-30.0, -1e-6, -1e-9, 0.0, 1e-9, 1e-6, 5.0, 30.0])
    k3 = kl_estimate(torch.zeros_like(d), d, "k3")
    assert (k3 >= 0).all() and torch.isfinite(k3).all()
    assert k3[3] == 0


# ----------------------------------------------------------------------------- shaped rewards

def _shaped_rewards_loop(scores, kl, mask, beta, no_eos=None, penalty=0.0):
    B, T = mask.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        last = None
        for t in range(T):
            if mask[b, t]:
                out[b, t] = -beta * kl[b, t]
                last = t
        if last is not None:
            out[b, last] += scores[b] - (penalty if no_eos is not None and no_eos[b] else 0.0)
    return out


def test_shaped_rewards_hand_case():
    logp = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0, 0.0], [-2.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0]])   # row 1 has holes, row 2 empty
    scores = torch.tensor([2.0, -1.0, 7.0])
    r, kl_sum = shaped_rewards(scores, logp, ref, mask, beta=0.1)
    # k1 row 0: [0.5, -1, 0] -> -0.1 * k1 = [-0.05, 0.1, 0], score 2 at t = 2
    # row 1: k1 at t = 1 is 0, at t = 3 is 0; score at the last masked t = 3
    want = torch.tensor([[-0.05, 0.1, 2.0, 0.0], [0.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(r, want)
    assert torch.allclose(kl_sum, torch.tensor([-0.5, 0.0, 0.0]))
    # the no-EOS penalty is subtracted from the score only on flagged rows
    r, _ = shaped_rewards(scores, logp, ref, mask, beta=0.1, no_eos=torch.tensor([True, False, True]),
                          no_eos_penalty=1.0)
    assert r[0, 2].item() == pytest.approx(1.0) and r[1, 3].item() == pytest.approx(-1.0)
    assert torch.all(r[2] == 0)


def test_shaped_rewards_brute_force_and_explicit_kl():
    g = torch.Generator().manual_seed(1)
    B, T = 5, 11
    logp = torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[3] = False
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    no_eos = torch.rand(B, generator=g) < 0.5
    for kind in ("k1", "k2", "k3"):
        r, kl_sum = shaped_rewards(scores, logp, ref, mask, beta=0.02, kind=kind, no_eos=no_eos,
                                   no_eos_penalty=1.0)
        k = kl_estimate(logp, ref, kind)
        want = _shaped_rewards_loop(scores, k, mask, 0.02, no_eos, 1.0)
        assert r.dtype == torch.float32
        assert torch.allclose(r.double(), want, atol=1e-6)
        assert torch.allclose(kl_sum.double(), (k * mask).sum(1), atol=1e-5)
    # an explicit KL (e.g. the exact one over the vocabulary) replaces the estimator entirely
    kl = torch.rand(B, T, generator=g, dtype=torch.float64)
    r, kl_sum = shaped_rewards(scores, None, None, mask, beta=0.5, kl=kl)
    assert torch.allclose(r.double(), _shaped_rewards_loop(scores, kl, mask, 0.5), atol=1e-6)
    assert torch.allclose(kl_sum.double(), (kl * mask).sum(1), atol=1e-5)


def test_shaped_rewards_ignores_padding_garbage_and_checks_shapes():
    logp = torch.tensor([[-1.0, float("nan")]])
    ref = torch.tensor([[-1.0, -float("inf")]])
    r, kl_sum = shaped_rewards(torch.tensor([3.0]), logp, ref, torch.tensor([[1, 0]]), beta=0.1)
    assert torch.equal(r, torch.tensor([[3.0, 0.0]])) and kl_sum.item() == 0.0
    with pytest.raises(ValueError, match="scores"):
        shaped_rewards(torch.zeros(2), logp, ref, torch.ones(1, 2), beta=0.1)
    with pytest.raises(ValueError, match="ref_logp"):
        shaped_rewards(torch.zeros(1), logp, ref[:, :1], torch.ones(1, 2), beta=0.1)
    with pytest.raises(ValueError, match="kl"):
        shaped_rewards(torch.zeros(1), None, None, torch.ones(1, 2), beta=0.1, kl=torch.zeros(1, 3))


# ----------------------------------------------------------------------------- reward normalisation

def test_running_moments_equal_concatenation():
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, generator=g, dtype=torch.float64) * 3 + 1 for n in (1, 7, 64, 5)]
    rm = RunningMoments()
    assert rm.std == 1.0                    # nothing seen yet: normalize is a no-op scale
    for b in batches:
        rm.update(b)
    allx = torch.cat(batches)
    assert rm.count == allx.numel()
    assert rm.mean == pytest.approx(allx.mean().item(), rel=1e-12)
    assert rm.std == pytest.approx(allx.std().item(), rel=1e-12)
    x = torch.tensor([0.0, 4.0], dtype=torch.float64)
    assert torch.allclose(rm.normalize(x), (x - allx.mean()) / (allx.std() + 1e-8))
    assert torch.allclose(rm.normalize(x, shift_mean=False), x / (allx.std() + 1e-8))
    rm2 = RunningMoments()
    rm2.load_state_dict(rm.state_dict())
    assert rm2.state_dict() == rm.state_dict()


# ----------------------------------------------------------------------------- advantages

def _gae_loop(rewards, values, mask, gamma, lam):
    """One scalar at a time, straight from the definition."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        nxt_a, nxt_v, nxt_m = 0.0, 0.0, 0.0
        for t in reversed(range(T)):
            if mask[b, t]:
                delta = rewards[b, t] + gamma * nxt_v * nxt_m - values[b, t]
                adv[b, t] = delta + gamma * lam * nxt_m * nxt_a
            nxt_a, nxt_v, nxt_m = adv[b, t].item(), values[b, t].item(), float(mask[b, t])
    ret = torch.where(mask.bool(), adv + values, torch.zeros_like(adv))
    return adv, ret


def _use_gae(monkeypatch, impl):
    """Point kernels.gae at one implementation of kernels/gae.py. These tests check how
    compute_advantages wires GAE and whitening; backend dispatch is the kernels' own concern."""
    import kernels
    mod = importlib.import_module("kernels.gae")
    monkeypatch.setattr(kernels, "gae", getattr(mod, impl))


@pytest.mark.parametrize("impl", ["gae_ref", "gae_torch"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_compute_advantages_matches_loop(monkeypatch, impl, gamma, lam):
    _use_gae(monkeypatch, impl)
    g = torch.Generator().manual_seed(3)
    B, T = 4, 13
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 9:] = False          # right padding
    mask[1, :3] = False          # left padding
    mask[2, 5:7] = False         # a hole: the scan must not cross it
    adv_want, ret_want = _gae_loop(rewards, values, mask, gamma, lam)
    adv, ret = compute_advantages(rewards, values, mask, gamma=gamma, lam=lam, whiten=False)
    assert torch.allclose(adv.double(), adv_want, atol=1e-5)
    assert torch.allclose(ret.double(), ret_want, atol=1e-5)
    adv_w, ret_w = compute_advantages(rewards, values, mask, gamma=gamma, lam=lam, whiten=True)
    # returns come from the unwhitened advantages; only the advantages are whitened
    assert torch.allclose(ret_w.double(), ret_want, atol=1e-5)
    assert torch.allclose(adv_w.double(), masked_whiten(adv_want, mask), atol=1e-5)
    assert torch.all(adv_w[~mask] == 0) and torch.all(ret_w[~mask] == 0)


def test_gae_hand_case(monkeypatch):
    _use_gae(monkeypatch, "gae_ref")
    # T = 3, gamma = 1, lam = 0.5, reward only at the end
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.25, 0.5]])
    m = torch.ones(1, 3)
    # delta = [0 + 0.25 - 0.5, 0 + 0.5 - 0.25, 1 - 0.5] = [-0.25, 0.25, 0.5]
    # A_2 = 0.5, A_1 = 0.25 + 0.5 * 0.5 = 0.5, A_0 = -0.25 + 0.5 * 0.5 = 0
    adv, ret = compute_advantages(r, v, m, gamma=1.0, lam=0.5, whiten=False)
    assert torch.allclose(adv, torch.tensor([[0.0, 0.5, 0.5]]))
    assert torch.allclose(ret, torch.tensor([[0.5, 0.75, 1.0]]))


# ----------------------------------------------------------------------------- KL controllers

def test_kl_controllers():
    fixed = FixedKLController(0.02)
    fixed.update(100.0, 512)
    assert fixed.value == 0.02
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(9.0, 512)                          # error 0.5 clipped to 0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000))
    v = c.value
    c.update(torch.tensor(6.6), 100)            # error 0.1, inside the clip range
    assert c.value == pytest.approx(v * (1 + 0.1 * 100 / 10000))
    v = c.value
    c.update(0.0, 1000)                         # error -1 clipped to -0.2
    assert c.value == pytest.approx(v * (1 - 0.2 * 1000 / 10000))
    c2 = AdaptiveKLController(1.0, target=1.0, horizon=1)
    c2.load_state_dict(c.state_dict())
    assert c2.state_dict() == c.state_dict()
    f2 = FixedKLController(0.5)
    f2.load_state_dict(fixed.state_dict())
    assert f2.value == 0.02
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


# ----------------------------------------------------------------------------- EMA

def test_ema_update_tensors_and_modules():
    e = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    p = [torch.tensor([3.0, 2.0]), torch.tensor([[10.0]])]
    ema_update(e, p, 0.75)
    assert torch.allclose(e[0], torch.tensor([1.5, 2.0])) and torch.allclose(e[1], torch.tensor([[2.5]]))
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [t.detach().clone() for t in a.parameters()]
    ema_update(a, b, 0.992)
    for e_, b_, p_ in zip(a.parameters(), before, b.parameters()):
        assert torch.allclose(e_, 0.992 * b_ + 0.008 * p_)
        assert e_.grad is None
    # fp32 EMA of bf16 weights takes the per-tensor path
    e32 = [torch.zeros(4)]
    ema_update(e32, [torch.ones(4, dtype=torch.bfloat16)], 0.5)
    assert torch.allclose(e32[0], torch.full((4,), 0.5)) and e32[0].dtype == torch.float32
    with pytest.raises(ValueError, match="params"):
        ema_update([torch.zeros(2)], [], 0.9)
    with pytest.raises(ValueError, match=r"params\[0\]"):
        ema_update([torch.zeros(2)], [torch.zeros(3)], 0.9)


# ----------------------------------------------------------------------------- minibatches / config

def test_minibatch_indices():
    g = torch.Generator().manual_seed(4)
    mbs = minibatch_indices(512, 64, g)
    assert len(mbs) == 8 and all(len(m) == 64 for m in mbs)
    assert torch.equal(torch.cat(mbs).sort().values, torch.arange(512))
    assert not torch.equal(torch.cat(mbs), torch.arange(512))
    again = minibatch_indices(512, 64, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(mbs, again))
    assert [len(m) for m in minibatch_indices(10, 4, g)] == [4, 4, 2]
    with pytest.raises(ValueError, match="minibatch_size"):
        minibatch_indices(10, 0, g)


def test_loo_center_hand_case_and_per_prompt_offsets():
    s = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 13.0])
    # each minus the mean of the other two of its prompt
    assert torch.equal(loo_center(s, 3), torch.tensor([-1.5, 0.0, 1.5, -1.5, -1.5, 3.0]))
    assert torch.equal(loo_center(s, 1), s)
    # a per-prompt offset (what the ranking loss cannot see) leaves the centred scores unchanged
    offset = torch.tensor([100.0, -7.0]).repeat_interleave(3)
    torch.testing.assert_close(loo_center(s + offset, 3), loo_center(s, 3))
    with pytest.raises(ValueError, match="groups of k=4"):
        loo_center(s, 4)


def test_ppo_config_defaults_and_checks():
    c = PPOConfig()
    assert (c.batch_size, c.minibatch_size, c.ppo_epochs) == (512, 64, 1)
    assert (c.beta, c.ptx_coef, c.ptx_ratio, c.ema_decay) == (0.02, 27.8, 8, 0.992)
    assert (c.gamma, c.lam, c.clip, c.value_lr) == (1.0, 0.95, 0.2, 9e-6)
    with pytest.raises(ValueError, match="minibatch_size"):
        PPOConfig(batch_size=100, minibatch_size=64)
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(kl_estimator="abs")
    assert (c.samples_per_prompt, c.critic) == (1, True)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        PPOConfig(batch_size=64, samples_per_prompt=3)
    with pytest.raises(ValueError, match="critic_warmup"):
        PPOConfig(critic=False, critic_warmup=2)
    with pytest.raises(ValueError, match="kl_target"):
        PPOConfig(adaptive_kl=True)


def test_shaped_rewards_pay_the_reference_term_token_by_token():
    """ref_weight * ref_logp_t on every response token (ref_term_logp replaces ref_logp there):
    the same return as ref_weight * sum_t ref_logp_t added to the score."""
    g = torch.Generator().manual_seed(2)
    B, T = 4, 7
    logp = torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.7
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    r, _ = shaped_rewards(scores, logp, ref, mask, beta=0.1, ref_weight=0.4)
    want = _shaped_rewards_loop(scores, kl_estimate(logp, ref), mask, 0.1) + 0.4 * ref * mask
    assert torch.allclose(r.double(), want, atol=1e-6)
    r0, _ = shaped_rewards(scores, logp, ref, mask, beta=0.1)
    assert torch.allclose((r - r0).sum(1).double(), 0.4 * (ref * mask).sum(1), atol=1e-5)
    other = torch.randn(B, T, generator=g, dtype=torch.float64)
    r2, _ = shaped_rewards(scores, logp, ref, mask, beta=0.1, ref_weight=0.4, ref_term_logp=other)
    assert torch.allclose((r2 - r0).double(), 0.4 * other * mask, atol=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        shaped_rewards(scores, None, None, mask, beta=0.1, kl=torch.zeros(B, T), ref_weight=0.4)
