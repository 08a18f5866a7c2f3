"""Helpers of bench/gpu_suite.sh: the environment report, one timing per kernel against its
baseline at one GPU-sized shape each, and `python3 -m bench` with GPU-sized chunks.

    python3 -m bench.gpu_check env                                  # versions, device, nvidia-smi
    python3 -m bench.gpu_check kernels [--results-dir DIR] [--tiny] # CUDA; --tiny: CPU smoke shapes
    python3 -m bench.gpu_check bench <python -m bench arguments>    # GPU_CHUNK_BYTES applied

The full sweeps are `python3 -m bench <name> --device cuda`; this is the few-second health check
that a fresh GPU machine runs before them: does each kernel compile, agree with its baseline on
the same inputs, and what speed ratio does it reach.

  attention causal   fwd+bwd bf16 B=4 H=16 T=2048 D=128: attention_triton vs SDPA's flash backend
  attention banded   same, window 256: attention_triton vs FlexAttention (sliding-window block mask,
                     torch.compile'd once for this shape; eager SDPA with an additive mask when
                     flex_attention is not available)
  linear_logprobs    fwd+bwd bf16 N=8192 d=2048 V=50257: linear_logprobs_triton vs eager
                     log_softmax(h @ W.T).gather
  linear_kl          fwd+bwd, same shape: linear_kl_triton vs eager log_softmax of both models
  gae                B=512 T=1024 fp32: gae_triton and the CUDA op vs the per-timestep loop
Rows go to <results>/gpu_check.csv (bench/common.py's Run: device, versions, commit, date), with
the max abs difference of the outputs against the baseline's in `max_abs_diff`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .common import DEFAULT_RESULTS, Run, quantiles_ms, rate, time_calls


def _grad_call(f, inputs, grads_of):
    """fn() running forward + backward of f(*inputs) w.r.t. the tensors in grads_of."""
    def call():
        out = f(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o.float() * w).sum() for o, w in zip(outs, _weights(outs)))
        return torch.autograd.grad(loss, grads_of)
    return call


_W = {}


def _weights(outs):
    """Fixed random output weights per shape, so the backward has a non-trivial upstream grad."""
    key = tuple((o.shape, o.device.type) for o in outs)
    if key not in _W:
        g = torch.Generator(device=outs[0].device).manual_seed(1)
        _W[key] = [torch.randn(o.shape, device=o.device, generator=g) for o in outs]
    return _W[key]


def _diff(a, b) -> float:
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def _case(run, case, unit, work, provs, baseline):
    """provs: name -> (fn, forward-only fn for the difference check); baseline first."""
    rows, ref_out = [], None
    for name, (fn, fwd) in provs.items():
        extra = {}
        try:
            out = fwd()
            if name == baseline:
                ref_out = out
            elif ref_out is not None:
                extra["max_abs_diff"] = _diff(out, ref_out)
        except Exception as e:  # noqa: BLE001 - a failing provider is a row, not the end of the check
            rows.append(run.add({**case, "provider": name,
                                 "status": f"error: {type(e).__name__}: {str(e)[:160]}".replace("\n", " ")}))
            continue
        if run.tiny:  # CPU smoke test (Triton interpreter: seconds a call): one timed call
            ms = quantiles_ms(time_calls(fn, run.device, 1))[0]
            rows.append(run.add({**case, "provider": name, "status": "ok", "median_ms": ms, "p20_ms": ms,
                                 "p80_ms": ms, "work": work, "work_unit": unit.split("/")[0],
                                 "rate": rate(work, ms, unit), "rate_unit": unit, **extra}))
            continue
        rows.append(run.measure(case, name, fn, work=work, work_unit=unit.split("/")[0],
                                rate_unit=unit, extra=extra))
    run.finish_case(rows, baseline)


def _flex_banded(window):
    """FlexAttention with a causal sliding-window block mask, compiled once; None if unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention)
    masks = {}

    def f(q, k, v):
        T = q.shape[-2]
        if T not in masks:
            masks[T] = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (qi - ki < window),
                                         None, None, T, T, device=q.device)
        return compiled(q, k, v, block_mask=masks[T])
    return f


def check_attention(run, dev, tiny):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    from kernels.attention import attention_mask, attention_ref, attention_triton
    B, H, T, D, w = (1, 2, 64, 16, 16) if tiny else (4, 16, 2048, 128, 256)
    dtype = torch.float32 if tiny else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    for mask in ("causal", "banded"):
        win = w if mask == "banded" else None
        # (query, key) pairs computed, counted as bench/attention.py does; fwd + bwd = 3.5x fwd
        n_pairs = T * T / 2 if win is None else min(w, T) * (min(w, T) + 1) / 2 + (T - min(w, T)) * min(w, T)
        flops = 4 * B * H * D * n_pairs * 3.5
        ours = lambda q, k, v, win=win: attention_triton(q, k, v, causal=True, window=win)  # noqa: E731
        if tiny:
            base_name, base = "eager", (lambda q, k, v, win=win: attention_ref(q, k, v, causal=True, window=win))
        elif mask == "causal":
            def base(q, k, v):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            base_name = "sdpa_flash"
        else:
            base = _flex_banded(w)
            base_name = "flex"
            if base is None:
                am = attention_mask(T, T, causal=True, window=w, device=dev)
                base = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=am)  # noqa: E731
                base_name = "sdpa_masked"
        provs = {}
        for name, f in ((base_name, base), ("ours", ours)):
            provs[name] = (_grad_call(f, (q, k, v), (q, k, v)),
                           (lambda f=f: f(q.detach(), k.detach(), v.detach())))
        _case(run, {"op": "attention", "mode": "fwd_bwd", "mask": mask,
                    "shape": f"B{B} H{H} T{T} D{D}" + (f" w{w}" if win else ""), "dtype": str(dtype)[6:]},
              "TFLOP/s", flops, provs, base_name)


def check_logprob_kl(run, dev, tiny):
    from kernels.kl import linear_kl_ref, linear_kl_triton
    from kernels.logprob import linear_logprobs_ref, linear_logprobs_triton
    N, d, V = (64, 32, 512) if tiny else (8192, 2048, 50257)
    dtype = torch.float32 if tiny else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(N, d, device=dev, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(V, d, device=dev, generator=g) * (2.5 / d ** 0.5)).to(dtype).requires_grad_()
    rh = torch.randn(N, d, device=dev, generator=g).to(dtype)
    rW = (torch.randn(V, d, device=dev, generator=g) * (2.5 / d ** 0.5)).to(dtype)
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    shape = {"shape": f"N{N} d{d} V{V}", "dtype": str(dtype)[6:]}
    flops = 2 * N * d * V * 3  # logits, dh, dW
    provs = {}
    for name, f in (("eager", linear_logprobs_ref), ("ours", linear_logprobs_triton)):
        provs[name] = (_grad_call(lambda h, W, f=f: f(h, W, t), (h, W), (h, W)),
                       (lambda f=f: f(h.detach(), W.detach(), t)))
    _case(run, {"op": "linear_logprobs", "mode": "fwd_bwd", **shape}, "TFLOP/s", flops, provs, "eager")
    provs = {}
    for name, f in (("eager", linear_kl_ref), ("ours", linear_kl_triton)):
        provs[name] = (_grad_call(lambda h, W, f=f: f(h, W, rh, rW, t), (h, W), (h, W)),
                       (lambda f=f: f(h.detach(), W.detach(), rh, rW, t)))
    _case(run, {"op": "linear_kl", "mode": "fwd_bwd", **shape}, "TFLOP/s", flops * 4 / 3, provs, "eager")


def check_gae(run, dev, tiny):
    from kernels.gae import gae_ref, gae_triton
    B, T = (8, 32) if tiny else (512, 1024)
    g = torch.Generator(device=dev).manual_seed(0)
    r, v = torch.randn(B, T, device=dev, generator=g), torch.randn(B, T, device=dev, generator=g)
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), device=dev, generator=g)
    m = (torch.arange(T, device=dev)[None] < lengths[:, None]).float()  # right-padded rows
    provs = {}
    cands = [("loop", gae_ref), ("triton", gae_triton)]
    if dev == "cuda":
        from kernels import _cpp
        cands.append(("cuda", _cpp.gae_cuda))
    for name, f in cands:
        call = lambda f=f: f(r, v, m, gamma=1.0, lam=0.95)  # noqa: E731
        provs[name] = (call, call)
    _case(run, {"op": "gae", "mode": "fwd", "shape": f"B{B} T{T}", "dtype": "float32"}, "GB/s",
          5 * 4 * B * T, provs, "loop")


def env() -> int:
    import platform
    import subprocess
    from .common import triton_version
    print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
          "| triton", triton_version(), flush=True)
    print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE", flush=True)
    try:
        subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                        "--format=csv"], timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        print("nvidia-smi:", e)
    return 0 if torch.cuda.is_available() else 1


def bench_gpu_chunks(argv) -> int:
    """`python -m bench ARGS` with kernels.logprob.CHUNK_BYTES = $GPU_CHUNK_BYTES: the chunked
    PyTorch providers (logprob and KL) keep one fp32 [rows, V] buffer of that size, and the 16 MiB
    default is sized for CPU caches (83 rows at V = 50257: hundreds of tiny GEMMs on a GPU)."""
    import os

    import kernels.logprob
    from .__main__ import main as bench_main
    n = os.environ.get("GPU_CHUNK_BYTES")
    if n:
        kernels.logprob.CHUNK_BYTES = int(n)
        print(f"chunked providers: CHUNK_BYTES = {int(n)} (GPU_CHUNK_BYTES)", flush=True)
    return bench_main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("env", "kernels", "bench"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    if argv[0] == "env":
        return env()
    if argv[0] == "bench":
        return bench_gpu_chunks(argv[1:])
    p = argparse.ArgumentParser(prog="python3 -m bench.gpu_check kernels", description=__doc__.split("\n")[0])
    p.add_argument("--results-dir", default=str(DEFAULT_RESULTS))
    p.add_argument("--tiny", action="store_true", help="CPU smoke shapes (Triton interpreter on CPU)")
    a = p.parse_args(argv[1:])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev != "cuda" and not a.tiny:
        print("gpu_check: no CUDA device (use --tiny for the CPU smoke shapes)", file=sys.stderr)
        return 2
    run = Run("gpu_check", device=dev, quick=True, tiny=a.tiny, plot=False, results_dir=Path(a.results_dir))
    print(f"== gpu_check on {run.env['device']} | torch {run.env['torch']} triton {run.env['triton']} | "
          f"commit {run.env['commit']} | {run.env['date']}", flush=True)
    for check in (check_gae, check_logprob_kl, check_attention):  # cheapest first; flex compiles last
        try:
            check(run, dev, a.tiny)
        except Exception as e:  # noqa: BLE001 - one kernel failing must not hide the others
            import traceback
            traceback.print_exc()
            print(f"gpu_check: {check.__name__} failed: {type(e).__name__}: {e}", file=sys.stderr)
    run.summary(["op", "mask"], "the case's baseline")
    bad = [r for r in run.rows if r["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
