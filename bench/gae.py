"""GAE: ours (Triton, CUDA, C++) vs the per-timestep reversed Python loop (kernels.gae.gae_ref,
the form TRL / OpenRLHF / verl run) vs a vectorized torch blocked scan (kernels.gae.gae_torch).

Inputs: fp32 rewards, values and a fp32 response mask [B, T] with trailing padding (lengths
uniform in [T/2, T]), gamma = 1, lam = 0.95 (InstructGPT's PPO setting).
Work: memory-bound; bytes = B*T*(3 inputs + 2 outputs)*4 -> GB/s. Baseline: `loop`.
Target (GPU, DESIGN.md sec. 6): >= 100x the loop at B=512, T=1024.
"""
import torch

import kernels
from kernels.gae import gae_ref, gae_torch

from .common import plot_sweep

DESCRIPTION = "masked GAE vs the Python loop"
BASELINE = "loop"


def shapes(run):
    if run.tiny:
        return [(8, 32)]
    if run.device == "cuda":
        return [(b, t) for b in (64, 512, 1024) for t in (128, 1024, 4096)]
    if run.quick:
        return [(64, 128), (512, 1024)]
    return [(64, 128), (512, 1024), (1024, 1024), (512, 4096)]


def make_inputs(B, T, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g)
    v = torch.randn(B, T, generator=g)
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=g)
    m = (torch.arange(T)[None] < lengths[:, None]).float()
    return r.to(device), v.to(device), m.to(device)


def providers(run):
    out = {}
    if run.device == "cuda":
        from kernels.gae import gae_triton
        out["triton"] = gae_triton
        from kernels import _cpp
        out["cuda"] = _cpp.gae_cuda
    else:
        if kernels._cpp_available():
            from kernels import _cpp
            out["cpp"] = _cpp.gae
    out["torch"] = gae_torch
    out["loop"] = gae_ref
    return {k: v for k, v in out.items() if run.want(k)}


def run(run):
    gamma, lam = 1.0, 0.95
    provs = providers(run)
    for B, T in shapes(run):
        r, v, m = make_inputs(B, T, run.device)
        case = {"B": B, "T": T, "dtype": "float32"}
        bytes_moved = 5 * 4 * B * T
        expect = gae_ref(r, v, m, gamma=gamma, lam=lam)
        rows = []
        for name, fn in provs.items():
            call = (lambda fn=fn: fn(r, v, m, gamma=gamma, lam=lam))
            try:  # correctness first: a fast wrong answer is not a result
                adv, ret = call()
                err = max((adv - expect[0]).abs().max().item(), (ret - expect[1]).abs().max().item())
            except Exception as e:  # noqa: BLE001
                rows.append(run.add({**case, "provider": name,
                                     "status": f"error: {type(e).__name__}: {str(e)[:160]}"}))
                continue
            rows.append(run.measure(case, name, call, work=bytes_moved, work_unit="bytes",
                                    rate_unit="GB/s", extra={"max_abs_err": err}))
        run.finish_case(rows, BASELINE)
    run.summary(["B", "T"], BASELINE)
    if run.plot:
        plot_sweep(run, x="T", series=[], facets=["B"], y="speedup_vs_baseline",
                   ylabel="speedup vs Python loop (x)")
