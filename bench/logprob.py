"""Fused linear -> log-softmax -> gather (kernels.linear_logprobs), fwd and fwd+bwd.

Providers (same hidden [N, d], weight [V, d], targets [N]):
  ours      GPU: kernels.logprob.linear_logprobs_triton; CPU: the C++ op kernels._cpp.linear_logprobs
  chunked   kernels.logprob.linear_logprobs_chunked (row chunks, never the full [N, V] logits)
  eager     torch.log_softmax((hidden @ weight.T).float(), -1).gather(1, targets[:, None])
  compile   torch.compile(eager, dynamic=True) (GPU by default; on CPU only with --providers)
  liger     Liger-Kernel LigerFusedLinearCrossEntropyLoss(reduction="sum") when installed
            (a loss, not per-token logprobs: same GEMMs and gradients, different output)
  lm_head_gemm  the bare lm_head GEMM hidden @ weight.T (and its dH, dW GEMMs with a given
            [N, V] gradient) on GPU: the speed of light; target fwd+bwd ours <= 1.3x this
Shapes: GPU bf16, N = 2k..32k tokens, d = 768..4096, V = 50257 / 128256; CPU fp32, smaller.
FLOPs (model FLOPs, written here): fwd = 2*N*d*V; fwd+bwd = 6*N*d*V (dH and dW GEMMs; the
fused kernels also recompute the logits, which is not counted). Baseline: eager.
Target (DESIGN.md sec. 6, V = 50257): ours peak memory <= 1/8 of eager and time <= eager.
"""
import torch

from .common import plot_sweep

DESCRIPTION = "linear_logprobs"
BASELINE = "eager"


def shapes(run):
    """[(N, d, V)]"""
    if run.tiny:
        return [(64, 32, 512)]
    if run.device == "cuda":
        # the V = 50257 target shapes first (a timeout keeps what finished), then 128k vocab
        return [(8192, 2048, 50257), (2048, 768, 50257), (8192, 768, 50257), (16384, 2048, 50257),
                (8192, 4096, 50257), (32768, 4096, 50257), (8192, 4096, 128256), (32768, 4096, 128256)]
    if run.quick:
        return [(512, 128, 8192), (1024, 256, 8192), (512, 256, 50257)]
    return [(1024, 256, 8192), (4096, 256, 8192), (1024, 768, 50257), (4096, 512, 50257)]


def eager_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)


def _compiled(fn):
    cache = {}

    def f(*a):
        if "fn" not in cache:
            cache["fn"] = torch.compile(fn, dynamic=True)
        return cache["fn"](*a)
    return f


def _liger():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # noqa: BLE001 - optional dependency
        return None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda h, w, t: loss(w, h, t)


def providers(run):
    """name -> (fn(hidden, weight, targets) -> logp [N] or a scalar loss, why-not)."""
    p = {}
    if run.device == "cuda":
        from kernels.logprob import linear_logprobs_triton
        p["ours"] = (lambda h, w, t: linear_logprobs_triton(h, w, t), "")
    else:
        import kernels
        if kernels._cpp_available():
            from kernels import _cpp
            p["ours"] = (lambda h, w, t: _cpp.linear_logprobs(h, w, t), "")
        else:
            p["ours"] = (None, "C++ ops unavailable")
    from kernels.logprob import linear_logprobs_chunked
    p["chunked"] = (lambda h, w, t: linear_logprobs_chunked(h, w, t), "")
    p["eager"] = (eager_logprobs, "")
    if run.device == "cuda" or (run.providers and "compile" in run.providers):
        p["compile"] = (_compiled(eager_logprobs), "")
    if run.device == "cuda":
        p["lm_head_gemm"] = (lambda h, w, t: h @ w.T, "")
    lg = _liger() if run.device == "cuda" else None
    p["liger"] = (lg, "" if lg else ("liger_kernel not installed" if run.device == "cuda" else "GPU only"))
    return {k: v for k, v in p.items() if run.want(k)}


def flops(N, d, V, mode):
    return (6 if mode == "fwd_bwd" else 2) * N * d * V


def make_inputs(N, d, V, device, dtype, n_sets=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_sets):
        h = torch.randn(N, d, generator=g).to(device, dtype)
        w = (torch.randn(V, d, generator=g) * 0.02).to(device, dtype)
        out += [h, w]
    t = torch.randint(0, V, (N,), generator=g).to(device)
    return out, t


def run_sweep(run, provs, shape_list, n_sets, flops_fn, call_builder, check_fn):
    """Shared by logprob and kl: for each (N, d, V) and mode, every provider on the same inputs."""
    dev = run.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    for N, d, V in shape_list:
        tensors, t = make_inputs(N, d, V, dev, dtype, n_sets)
        for mode in ("fwd", "fwd_bwd"):
            case = {"mode": mode, "N": N, "d": d, "V": V, "dtype": str(dtype).split(".")[-1]}
            ref_out = None
            rows = []
            for name, (fn, why) in provs.items():
                if fn is None:
                    rows.append(run.skip(case, name, why))
                    continue
                extra = {}
                if mode == "fwd" and name not in ("liger", "lm_head_gemm"):
                    try:
                        with torch.no_grad():
                            out = check_fn(fn, tensors, t)
                        if ref_out is None and "eager" in provs:
                            with torch.no_grad():
                                ref_out = check_fn(provs["eager"][0], tensors, t)
                        if ref_out is not None:
                            extra["max_abs_err_vs_eager"] = (out - ref_out).abs().max().item()
                        del out
                    except Exception as e:  # noqa: BLE001
                        rows.append(run.add({**case, "provider": name,
                                             "status": f"error: {type(e).__name__}: {str(e)[:160]}"}))
                        continue
                call = call_builder(fn, tensors, t, mode)
                rows.append(run.measure(case, name, call, work=flops_fn(N, d, V, mode), work_unit="flop",
                                        rate_unit="TFLOP/s" if dev == "cuda" else "GFLOP/s", extra=extra))
            run.finish_case(rows, BASELINE)
        del tensors, t


def _call(fn, tensors, t, mode):
    h, w = tensors
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(h, w, t)
        return call
    hg, wg = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
    g_out = torch.randn(h.shape[0], device=h.device)
    g_full = {}

    def call():
        hg.grad = wg.grad = None
        out = fn(hg, wg, t)
        if out.dim() == 0:
            out.backward()
        elif out.dim() == 2:              # lm_head_gemm: logits [N, V], gradient made once
            if "g" not in g_full:
                g_full["g"] = torch.randn_like(out)
            out.backward(g_full["g"])
        else:
            out.backward(g_out)
    return call


def run(run):
    provs = providers(run)
    run_sweep(run, provs, shapes(run), 1, flops, _call, lambda fn, ts, t: fn(ts[0], ts[1], t).float())
    run.summary(["mode", "N", "d", "V"], BASELINE)
    if run.plot:
        plot_sweep(run, x="N", series=["d"], facets=["mode", "V"], y="speedup_vs_baseline",
                   ylabel="speedup vs eager (x)")
        plot_sweep_mem(run)


def plot_sweep_mem(run):
    import copy
    r2 = copy.copy(run)
    r2.bench = run.bench + "_mem"
    plot_sweep(r2, x="N", series=["d"], facets=["mode", "V"], y="peak_mem_mb", ylabel="peak memory (MB)")
