"""Shared-prompt packing of ranking groups (collate_rankings(share_prompt=True), branch_ids):
each completion must get exactly the score and gradients it gets after its own copy of the
prompt, with dense and banded layers; and the inverse-CDF sampler draws from the given
probabilities."""
import pytest
import torch

import kernels
from engine.config import GPTConfig
from engine.data import collate_rankings
from engine.model import RewardModel, _draw
from kernels.attention import attention_ref, attention_torch, segment_positions
from recipes.rm import group_rewards


def test_segment_positions_continue_each_branch_after_its_prefix():
    seg = torch.tensor([[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
    br = torch.tensor([[0, 0, 1, 1, 2, 2, 0, 1, 2, 2, 0, 0]])
    assert segment_positions(seg, br)[0, :10].tolist() == [0, 1, 2, 3, 2, 3, 0, 1, 1, 2]
    assert segment_positions(seg)[0, :10].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]


@pytest.mark.parametrize("window", [None, 3])
def test_branch_attention_equals_prefix_plus_branch_alone(window):
    torch.manual_seed(0)
    lens = [(4, [3, 1, 5]), (2, [2, 4])]  # (prefix, branch lengths) per segment
    seg, br, parts = [], [], []
    for s, (p, bl) in enumerate(lens, start=1):
        seg += [s] * (p + sum(bl))
        br += [0] * p + [k for k, n in enumerate(bl, start=1) for _ in range(n)]
        parts.append((len(seg) - p - sum(bl), p, bl))
    seg, br = torch.tensor([seg + [0]]), torch.tensor([br + [0]])
    T = seg.shape[1]
    q, k, v = (torch.randn(1, 2, T, 8, requires_grad=True) for _ in range(3))
    out = attention_torch(q, k, v, window=window, segment_ids=seg, branch_ids=br)
    ref = attention_ref(q, k, v, window=window, segment_ids=seg, branch_ids=br)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, p, bl in parts:  # every branch against its prefix + itself, computed alone
        c = a + p
        for n in bl:
            cols = list(range(a, a + p)) + list(range(c, c + n))
            alone = attention_ref(q[:, :, cols], k[:, :, cols], v[:, :, cols], window=window)
            torch.testing.assert_close(out[:, :, c:c + n], alone[:, :, p:], rtol=1e-5, atol=1e-5)
            c += n
    g = torch.randn_like(out)
    d_out = torch.autograd.grad(out, (q, k, v), g)
    d_ref = torch.autograd.grad(ref, (q, k, v), g)
    for x, y in zip(d_out, d_ref):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    # kernels.attention routes branch calls to a path that honours them
    torch.testing.assert_close(kernels.attention(q, k, v, window=window, segment_ids=seg, branch_ids=br),
                               ref, rtol=1e-5, atol=1e-5)


def _groups(seed=1, n=6):
    g = torch.Generator().manual_seed(seed)
    groups = []
    for i in range(n):  # groups of 2-5 completions after a prompt of 3-9 tokens
        P = int(torch.randint(3, 10, (1,), generator=g))
        p = torch.randint(3, 64, (P,), generator=g).tolist()
        ids = [p + torch.randint(3, 64, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist() + [2]
               for _ in range(2 + i % 4)]
        groups.append({"ids": ids, "last_idx": [len(s) - 1 for s in ids], "ranking": list(range(len(ids))),
                       "prompt_len": P})
    return groups


def test_shared_prompt_scores_and_gradients_equal_unpacked():
    torch.manual_seed(0)
    # window 4 < the sequences: the band must count positions, not packed columns. Three layers
    # (dense, banded, dense): the last token reads a banded layer's output at tokens whose band
    # reaches into the prompt (with two, the banded last layer's EOS sees only its own branch)
    rm = RewardModel(GPTConfig(n_layer=3, d_model=32, n_head=2, d_head=16, block_size=32,
                               vocab_size=64, window=4, dropout=0.0))
    groups = _groups()
    padded_b = collate_rankings(groups, 0)
    shared_b = collate_rankings(groups, 0, pack_len=24, share_prompt=True)
    assert shared_b.branch_ids is not None and shared_b.ids.numel() < collate_rankings(groups, 0, pack_len=24).ids.numel()
    # a group longer than a row is split, each part with its own copy of the prompt
    assert max(sum(len(s) for s in gr["ids"]) - (len(gr["ids"]) - 1) * gr["prompt_len"] for gr in groups) > 24
    for i, s in enumerate(s for gr in groups for s in gr["ids"]):  # each completion read at its EOS
        assert shared_b.ids[shared_b.row[i], shared_b.last_idx[i]] == s[-1] == 2
    w = torch.randn(padded_b.ranking.shape)
    grads = []
    for b in (padded_b, shared_b):
        rm.zero_grad()
        r = group_rewards(rm, b)
        (r * w).sum().backward()
        grads.append((r.detach(), {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}))
    (r0, g0), (r1, g1) = grads
    torch.testing.assert_close(r1, r0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5, msg=lambda s: f"{n}: {s}")


def test_shared_prompt_bad_input():
    groups = _groups(n=2)
    with pytest.raises(ValueError, match="needs pack_len"):
        collate_rankings(groups, 0, share_prompt=True)
    bad = [dict(groups[0]), groups[1]]
    bad[0].pop("prompt_len")
    with pytest.raises(ValueError, match="group 0 has no prompt_len"):
        collate_rankings(bad, 0, pack_len=32, share_prompt=True)
    other = [dict(groups[0], ids=[groups[0]["ids"][0], [60] + groups[0]["ids"][1][1:]])]
    with pytest.raises(ValueError, match="does not start with the group's"):
        collate_rankings(other, 0, pack_len=32, share_prompt=True)


def test_draw_follows_the_probabilities():
    p = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 2.0]]).repeat(50_000, 1)
    t = _draw(p, torch.Generator().manual_seed(0))
    freq = torch.bincount(t[0::2], minlength=4).double() / 50_000
    # binomial standard error <= 0.0023: 5 sigma
    assert (freq - torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.double)).abs().max() < 0.012
    assert (t[1::2] == 3).all()  # unnormalised row, all mass on one token
    again = _draw(p, torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
