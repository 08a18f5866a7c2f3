"""Fused policy / reference logprobs + exact per-token KL(pi || pi_ref) (kernels.linear_kl).

Providers (same hidden, weight, ref_hidden, ref_weight [N, d] / [V, d], targets [N]):
  ours      GPU: kernels.kl.linear_kl_triton; CPU: the C++ op kernels._cpp.linear_kl
  chunked   kernels.kl.linear_kl_chunked
  eager     lp = log_softmax((h @ W.T).float()), rlp = the same for the reference;
            logp = lp.gather(t), ref_logp = rlp.gather(t), kl = sum_v exp(lp) * (lp - rlp)
  compile   torch.compile(eager, dynamic=True) (GPU by default; on CPU only with --providers)
fwd+bwd: backward of (logp . g1 + kl . g2) into hidden and weight (the reference is constant).
FLOPs (model FLOPs, written here): fwd = 4*N*d*V (two logit GEMMs); fwd+bwd = 8*N*d*V
(+ dH and dW of the policy side). Shapes as bench.logprob. Baseline: eager.
"""
import torch

from .logprob import _compiled, plot_sweep_mem, run_sweep, shapes
from .common import plot_sweep

DESCRIPTION = "linear_kl"
BASELINE = "eager"


def eager_kl(h, w, rh, rw, t):
    lp = torch.log_softmax((h @ w.T).float(), -1)
    rlp = torch.log_softmax((rh @ rw.T).float(), -1)
    logp = lp.gather(1, t[:, None]).squeeze(1)
    ref_logp = rlp.gather(1, t[:, None]).squeeze(1)
    kl = (lp.exp() * (lp - rlp)).sum(-1)
    return logp, ref_logp, kl


def providers(run):
    p = {}
    if run.device == "cuda":
        from kernels.kl import linear_kl_triton
        p["ours"] = (linear_kl_triton, "")
    else:
        import kernels
        if kernels._cpp_available():
            from kernels import _cpp
            p["ours"] = (_cpp.linear_kl, "")
        else:
            p["ours"] = (None, "C++ ops unavailable")
    from kernels.kl import linear_kl_chunked
    p["chunked"] = (linear_kl_chunked, "")
    p["eager"] = (eager_kl, "")
    if run.device == "cuda" or (run.providers and "compile" in run.providers):
        p["compile"] = (_compiled(eager_kl), "")
    return {k: v for k, v in p.items() if run.want(k)}


def flops(N, d, V, mode):
    return (8 if mode == "fwd_bwd" else 4) * N * d * V


def _call(fn, tensors, t, mode):
    h, w, rh, rw = tensors
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(h, w, rh, rw, t)
        return call
    hg, wg = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    g1 = torch.randn(h.shape[0], generator=g).to(h.device)
    g2 = torch.randn(h.shape[0], generator=g).to(h.device)

    def call():
        hg.grad = wg.grad = None
        logp, _, kl = fn(hg, wg, rh, rw, t)
        torch.autograd.backward([logp, kl], [g1, g2])
    return call


def _check(fn, ts, t):
    logp, ref_logp, kl = fn(*ts, t)
    return torch.cat([logp.float(), ref_logp.float(), kl.float()])


def run(run):
    provs = providers(run)
    run_sweep(run, provs, shapes(run), 2, flops, _call, _check)
    run.summary(["mode", "N", "d", "V"], BASELINE)
    if run.plot:
        plot_sweep(run, x="N", series=["d"], facets=["mode", "V"], y="speedup_vs_baseline",
                   ylabel="speedup vs eager (x)")
        plot_sweep_mem(run)
