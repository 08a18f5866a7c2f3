"""torch.compile support: the Triton attention as torch.library ops (fake kernels, autograd), the
CPU attention path without host syncs, and `compile_blocks` / train.compile. Compiled with
backend="aot_eager" and fullgraph=True: a graph break fails the test, and no C++ is compiled."""
import copy
import importlib

import pytest
import torch

import kernels
from engine.config import GPTConfig
from engine.model import GPT, Block, compile_blocks

A = importlib.import_module("kernels.attention")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def _qkvd(B, H, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to(DEV) for _ in range(4)]


def _three_ways(kw, qkvd):
    """(out, dq, dk, dv) of kernels.attention eager, compiled to one graph, and the reference."""
    def fn(a, b, c):
        return kernels.attention(a, b, c, **kw)
    return (_grads(fn, *qkvd), _grads(torch.compile(fn, backend="aot_eager", fullgraph=True), *qkvd),
            _grads(lambda a, b, c: kernels.attention_ref(a, b, c, **kw), *qkvd))


# window + left padding (batch 1's first 11 queries see no key), and packed segments
KW = [dict(window=7, kv_start=torch.tensor([0, 11])),
      dict(segment_ids=torch.tensor([[0] * 8 + [1] * 11, [3] * 19]))]


@pytest.mark.parametrize("kw", KW, ids=["window-kvstart", "segments"])
def test_triton_attention_compiles_to_one_graph(kw, monkeypatch):
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    kw = {k: v.to(DEV) if torch.is_tensor(v) else v for k, v in kw.items()} | {"causal": True}
    kw.setdefault("window", None)
    eager, compiled, ref = _three_ways(kw, _qkvd(2, 2, 19, 16))
    for e, c, r in zip(eager, compiled, ref):
        torch.testing.assert_close(c, e, rtol=0, atol=0)   # the same kernels run
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-4)


def test_triton_attention_ops_pass_opcheck():
    q, k, v, do = _qkvd(2, 2, 19, 16, seed=1)
    kv0 = torch.tensor([0, 5], device=DEV)
    torch.library.opcheck(torch.ops.engine_triton.attention_fwd.default,
                          (q, k, v, True, 7, None, kv0, None))
    o, lse = torch.ops.engine_triton.attention_fwd(q, k, v, True, None, 0.3, kv0, None)
    torch.library.opcheck(torch.ops.engine_triton.attention_bwd.default,
                          (do, q, k, v, o, lse, True, None, 0.3, kv0, None))
    qg = q.clone().requires_grad_(True)  # autograd registration: the op's grads are the kernels'
    torch.ops.engine_triton.attention_fwd(qg, k, v, True, None, 0.3, kv0, None)[0].backward(do)
    dq, _, _ = torch.ops.engine_triton.attention_bwd(do, q, k, v, o, lse, True, None, 0.3, kv0, None)
    torch.testing.assert_close(qg.grad, dq, rtol=0, atol=0)


@pytest.mark.parametrize("with_ent", [False, True])
def test_triton_linear_logprobs_compiles_to_one_graph(with_ent, monkeypatch):
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    g = torch.Generator().manual_seed(4)
    h = torch.randn(37, 24, generator=g).to(DEV)
    w = (0.3 * torch.randn(101, 24, generator=g)).to(DEV)
    t = torch.randint(0, 101, (37,), generator=g).to(DEV)
    t[::5] = -100                                             # ignored rows: 0 out, no gradient
    g_lp, g_en = torch.randn(37, generator=g).to(DEV), torch.randn(37, generator=g).to(DEV)

    def run(fn):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fn(hh, ww)
        loss = (out[0] * g_lp + out[1] * g_en).sum() if with_ent else (out * g_lp).sum()
        loss.backward()
        return [*(out if with_ent else (out,)), hh.grad, ww.grad]

    def fn(hh, ww):
        return kernels.linear_logprobs(hh, ww, t, temperature=0.7, return_entropy=with_ent)

    eager = run(fn)
    compiled = run(torch.compile(fn, backend="aot_eager", fullgraph=True))
    ref = run(lambda hh, ww: kernels.linear_logprobs_ref(hh, ww, t, temperature=0.7, return_entropy=with_ent))
    for e, c, r in zip(eager, compiled, ref):
        torch.testing.assert_close(c, e, rtol=0, atol=0)
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-4)


def test_triton_linear_logprobs_ops_pass_opcheck():
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(19, 16, generator=g).to(DEV), torch.randn(67, 16, generator=g).to(DEV)
    t = torch.randint(0, 67, (19,), generator=g).to(DEV)
    t[3] = -100
    torch.library.opcheck(torch.ops.engine_triton.linear_logprobs_fwd.default, (h, w, t, 1.3, True, None, 64))
    logp, ent, lse = torch.ops.engine_triton.linear_logprobs_fwd(h, w, t, 1.3, True, None, None)
    gl, ge = torch.randn(19, generator=g).to(DEV), torch.randn(19, generator=g).to(DEV)
    for args in ((gl, ge, True, True), (gl, None, True, False), (None, ge, False, True)):
        torch.library.opcheck(torch.ops.engine_triton.linear_logprobs_bwd.default,
                              (args[0], args[1], h, w, t, lse, ent, 1.3, True, args[2], args[3], None))


@pytest.mark.skipif(DEV == "cuda", reason="the SDPA path with explicit masks is the CPU path")
def test_cpu_attention_with_empty_rows_compiles_without_graph_break(monkeypatch):
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    kw = dict(causal=True, window=4, kv_start=torch.tensor([2, 9]))
    eager, compiled, ref = _three_ways(kw, _qkvd(2, 3, 13, 8, seed=2))
    for e, c, r in zip(eager, compiled, ref):
        torch.testing.assert_close(c, r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(e, r, rtol=1e-5, atol=1e-5)
    assert compiled[0][1, :, :9].abs().max() == 0 and compiled[1][1, :, :9].abs().max() == 0


def _tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, d_model=32, n_head=2, d_head=16, block_size=32, vocab_size=67,
                         window=8, dropout=0.0)).to(DEV)


def test_compile_blocks_matches_eager_and_leaves_the_model_alone():
    eager, comp = _tiny(), _tiny()
    keys = list(comp.state_dict())
    compile_blocks(comp, backend="aot_eager", fullgraph=True)
    assert all(b.compiled is not None for b in comp.h) and list(comp.state_dict()) == keys
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 67, (3, 21), generator=g).to(DEV)
    seg = torch.tensor([[0] * 10 + [1] * 11, [0] * 21, [4] * 5 + [5] * 16], device=DEV)
    w = torch.randn(3, 20, generator=g).to(DEV)
    for m in (eager, comp):
        (m.logprobs(x) * w).sum().backward()
        (m(x[:, :-1], x[:, 1:], segment_ids=seg[:, :-1]) * w).sum().backward()
    for (n, pe), pc in zip(eager.named_parameters(), comp.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-5, atol=1e-6, msg=n)
    # copies stay compiled; decoding (KV cache) runs the eager path and samples the same tokens
    twin = copy.deepcopy(comp)
    assert all(b.compiled == comp.h[0].compiled for b in twin.h)
    prompt = x[:, :5]
    a = eager.generate(prompt, 6, temperature=1.0, seed=11)
    b = twin.generate(prompt, 6, temperature=1.0, seed=11)
    assert torch.equal(a, b)
    compile_blocks(twin, enabled=False)
    assert all(blk.compiled is None for blk in twin.modules() if isinstance(blk, Block))


def test_train_compile_reaches_every_model(tmp_path):
    from recipes import common
    from recipes.pretrain import PretrainConfig
    cfg = PretrainConfig()
    cfg.train.compile = True
    cfg.model.n_layer = 1

    class Tok:
        vocab_size = 50
    model = common.build_model(cfg, Tok(), torch.device("cpu"))
    assert [b.compiled for b in model.h] == [()]
    cfg.train.compile = False
    assert common.build_model(cfg, Tok(), torch.device("cpu")).h[0].compiled is None
