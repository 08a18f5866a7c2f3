"""Compile every Triton kernel at every shipped tile config for a GPU target, without a GPU.

    python -m bench aot [--arch 90] [--only SUBSTRING] [--jobs N] [--out FILE]

Each kernel is compiled by Triton's own compiler for `GPUTarget("cuda", arch, 32)` (this works on
a CPU-only machine and produces a cubin), with the argument specialization a real launch gets:
16-byte aligned pointers, integer arguments equal to 1 turned into constants and multiples of 16
marked divisible, exactly as the JIT does. Resource use is read from the cubin with the
`cuobjdump` that ships inside the Triton wheel (triton/backends/nvidia/bin).

One row per kernel and config: shared memory (Triton's dynamic allocation + static), registers
per thread, local-memory stack (spills), the MMA kind in the PTX (wgmma / mma / fma) and the
compile time (near 0 when Triton's cache in ~/.triton already holds that cubin). Exit status 1 when a config needs more than 227 KB of shared memory (the sm_90
per-block limit), when a bf16 / fp16 training config (attention with Tq > 16, fused logprob /
KL) has a local-memory stack, or when a config fails to compile.

Caution: only the bf16 variant of each 16-bit config is compiled (fp16 uses the same tiles and
the same MMA shapes); fp32 and decode configs are reported, and only their shared memory is a
failure. A cubin without spills can still be slow: this checks that configs fit, not speed.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

SMEM_LIMIT = 227 * 1024
# typical runtime values: they decide which integers the JIT specializes (== 1, % 16 == 0)
B, H, T = 4, 16, 2048
N, D_MODEL, VOCAB = 8192, 2048, 50257


@dataclass
class Spec:
    kernel: str
    config: str
    fn: object
    args: dict                 # parameter name -> "*dtype" pointer, int, float or constexpr value
    warps: int
    stages: int
    training: bool             # a 16-bit training config: spills are a failure
    result: dict = field(default_factory=dict)


def _attention_specs():
    import importlib
    A = importlib.import_module("kernels.attention")
    from kernels.attention_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _bwd_delta
    from kernels.attention_fwd import _attn_fwd

    def base(d_pad, kind, mask, bucket, seg):
        dt = "bf16" if kind == "16" else "fp32"
        tq = 1 if bucket == "decode" else T
        strides = dict(zip(("sqb", "sqh", "sqt", "sqd"), (H * tq * d_pad, tq * d_pad, d_pad, 1)))
        for p in ("k", "v", "d"):
            t = T if p != "d" else tq
            strides.update(zip((f"s{p}b", f"s{p}h", f"s{p}t", f"s{p}d"), (H * t * d_pad, t * d_pad, d_pad, 1)))
        args = dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", O=f"*{dt}", DO=f"*{dt}", DK=f"*{dt}",
                    DV=f"*{dt}", DQ="*fp32", LSE="*fp32", DELTA="*fp32", KV0="*i32", SEG="*i32",
                    H=H, Tq=tq, Tk=T, D=d_pad, window=256, qk_mul=0.18, scale=0.125, **strides,
                    CAUSAL=mask != "full", HAS_WINDOW=mask == "band", HAS_KV0=bucket == "decode",
                    HAS_SEG=seg, D_PAD=d_pad, PREC="tf32" if kind == "16" else "ieee")
        return args

    specs = []

    def add(name, fn, key, cfg, seg=False, **extra):
        d_pad, kind, mask, bucket = key
        bm, bn, warps, stages = cfg
        args = base(d_pad, kind, mask, bucket, seg)
        args.update(BLOCK_M=bm, BLOCK_N=bn, **extra)
        tag = f"D{d_pad} {'bf16' if kind == '16' else 'fp32'} {mask}{'+seg' if seg else ''} {bucket}"
        tag += "".join(f" {k}={v}" for k, v in extra.items())
        specs.append(Spec(name, f"{tag} BM{bm} BN{bn}", fn, args, warps, stages,
                          kind == "16" and bucket == "train"))

    for key, cfg in A.FWD_CONFIGS.items():
        add("attn_fwd", _attn_fwd, key, cfg)
        if key[2] != "full" and key[3] == "train":
            add("attn_fwd", _attn_fwd, key, cfg, seg=True)
    for key, cfg in A.DKDV_CONFIGS.items():
        for atomic in ((True, False) if key[3] == "train" else (False,)):
            add("attn_bwd_dkdv", _attn_bwd_dkdv, key, cfg, DQ_ATOMIC=atomic)
        if key[2] != "full" and key[3] == "train":
            add("attn_bwd_dkdv", _attn_bwd_dkdv, key, cfg, seg=True, DQ_ATOMIC=True)
    for key, cfg in A.DQ_CONFIGS.items():
        add("attn_bwd_dq", _attn_bwd_dq, key, cfg)
        specs[-1].args["DQ"] = specs[-1].args["Q"]
    for d_pad in (16, 32, 64, 128, 256):
        add("attn_bwd_delta", _bwd_delta, (d_pad, "16", "full", "train"), (64, 0, 4, 1))
        specs[-1].training = False
    return specs


def _fused_specs():
    from kernels import kl as K
    from kernels import logprob as L
    specs = []

    def args_for(kind, bn, bv, bk, **extra):
        dt = "bf16" if kind == "16" else "fp32"
        a = dict(h_ptr=f"*{dt}", w_ptr=f"*{dt}", rh_ptr=f"*{dt}", rw_ptr=f"*{dt}", dz_ptr=f"*{dt}",
                 tgt_ptr="*i64", part_ptr="*fp32", lse_ptr="*fp32", rlse_ptr="*fp32",
                 ent_ptr="*fp32", kl_ptr="*fp32", glp_ptr="*fp32", gent_ptr="*fp32",
                 gkl_ptr="*fp32", N=N, V=VOCAB, D=D_MODEL, DR=D_MODEL, stride_h=D_MODEL,
                 stride_w=D_MODEL, stride_rh=D_MODEL, stride_rw=D_MODEL, stride_dz=8192,
                 inv_temp=1.0, TILES_PER_SPLIT=7, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk,
                 GROUP=L.GROUP_ROWS, PREC="tf32" if kind == "16" else "ieee", UPCAST=False)
        a.update(extra)
        return a

    for name, fn, table, flag in (("logprob_fwd", L._fwd_kernel, L.FWD_CONFIGS, "WITH_ENT"),
                                  ("logprob_bwd_dz", L._bwd_dz_kernel, L.BWD_CONFIGS, "HAS_ENT"),
                                  ("kl_fwd", K._kl_fwd_kernel, K.KL_FWD_CONFIGS, None),
                                  ("kl_bwd_dz", K._kl_bwd_dz_kernel, K.KL_BWD_CONFIGS, "HAS_KL")):
        for (kind, bucket), (bn, bv, bk, warps, stages) in table.items():
            for val in ((False, True) if flag else (None,)):
                extra = {flag: val} if flag else {}
                tag = (f"{'bf16' if kind == '16' else 'fp32'} N-{bucket} BN{bn} BV{bv} BK{bk}"
                       + "".join(f" {k}={v}" for k, v in extra.items()))
                specs.append(Spec(name, tag, fn, args_for(kind, bn, bv, bk, **extra), warps,
                                  stages, kind == "16"))
    return specs


def _gae_specs():
    from kernels.gae import _gae_kernel
    args = dict(r_ptr="*fp32", v_ptr="*fp32", m_ptr="*u8", adv_ptr="*fp32", ret_ptr="*fp32",
                B=512, T=1024, stride_r=1024, stride_v=1024, stride_m=1024, gamma=1.0, gl=0.95,
                BLOCK_B=16, BLOCK_T=128)
    return [Spec("gae", "BB16 BT128", _gae_kernel, args, 4, 3, False)]


def all_specs():
    return _attention_specs() + _fused_specs() + _gae_specs()


def params(fn):
    """The kernel's parameters (name, is_constexpr); also for interpreted kernels (tests)."""
    if not hasattr(fn, "params"):
        from triton.runtime.jit import JITFunction
        fn = JITFunction(fn.fn)
    return fn.params


def _signature(spec):
    """(signature, constexprs, attrs) as the JIT would specialize a launch with spec.args."""
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(params(spec.fn)):
        if p.name not in spec.args:
            raise KeyError(f"{spec.kernel}: no example value for parameter {p.name!r}")
        val = spec.args[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[p.name] = val
        elif isinstance(val, str):
            sig[p.name] = val
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(val, bool) or isinstance(val, float):
            sig[p.name] = "fp32" if isinstance(val, float) else "i1"
        elif val == 1:
            sig[p.name] = "constexpr"
            const[p.name] = 1
        else:
            sig[p.name] = "i32" if abs(val) < 2 ** 31 else "i64"
            if val % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def _cuobjdump():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(spec, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, const, attrs = _signature(spec)
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn=spec.fn, signature=sig, constexprs=const, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=spec.warps, num_stages=spec.stages))
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a reported failure
        msg = str(e).strip().splitlines()
        return dict(error=(msg[-1] if msg else type(e).__name__)[:160],
                    seconds=time.perf_counter() - t0)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    res = {key.lower(): int(v) for key, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    ptx = k.asm.get("ptx", "")
    mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "fma"
    return dict(smem=int(k.metadata.shared) + res.get("shared", 0), regs=res.get("reg", -1),
                stack=res.get("stack", 0) + res.get("local", 0), mma=mma,
                seconds=time.perf_counter() - t0)


def verdict(spec, r):
    if "error" in r:
        return "FAIL compile"
    if r["smem"] > SMEM_LIMIT:
        return "FAIL smem"
    if spec.training and r["stack"] > 0:
        return "FAIL spills"
    return "ok"


_SPECS = None


def _work(args):
    i, arch = args
    return i, compile_one(_SPECS[i], arch)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench aot", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90)")
    p.add_argument("--only", default=None,
                   help="compile only specs whose 'kernel config' contains one of these "
                        "comma-separated substrings")
    p.add_argument("--jobs", type=int, default=1, help="parallel compiler processes (default 1)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench aot: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)",
              file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # Triton 3.9's default, stated
    import triton
    global _SPECS
    subs = a.only.split(",") if a.only else None
    _SPECS = [s for s in all_specs()
              if subs is None or any(x in f"{s.kernel} {s.config}" for x in subs)]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    lines = [f"# bench aot: triton {triton.__version__}, target cuda sm_{a.arch}, "
             f"{len(_SPECS)} configs, commit {commit or '?'}, "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"# limits: shared memory <= {SMEM_LIMIT} B; no local-memory stack in 16-bit training "
             f"configs (train=yes)",
             f"{'kernel':<15} {'config':<52} {'warps':>5} {'stages':>6} {'smem_B':>7} {'regs':>4} "
             f"{'stack_B':>7} {'mma':>5} {'train':>5} {'sec':>5}  status"]
    for ln in lines:
        print(ln, flush=True)
    t0 = time.perf_counter()
    jobs = [(i, a.arch) for i in range(len(_SPECS))]
    if a.jobs > 1:
        import multiprocessing as mp
        pool = mp.get_context("fork").Pool(a.jobs)
        results = pool.imap(_work, jobs)
    else:
        pool = None
        results = map(_work, jobs)
    bad = 0
    for i, r in results:
        s = _SPECS[i]
        v = verdict(s, r)
        bad += v != "ok"
        if "error" in r:
            row = (f"{s.kernel:<15} {s.config:<52} {s.warps:>5} {s.stages:>6} {'-':>7} {'-':>4} "
                   f"{'-':>7} {'-':>5} {'yes' if s.training else 'no':>5} {r['seconds']:>5.1f}  "
                   f"{v}: {r['error']}")
        else:
            row = (f"{s.kernel:<15} {s.config:<52} {s.warps:>5} {s.stages:>6} {r['smem']:>7} "
                   f"{r['regs']:>4} {r['stack']:>7} {r['mma']:>5} "
                   f"{'yes' if s.training else 'no':>5} {r['seconds']:>5.1f}  {v}")
        lines.append(row)
        print(row, flush=True)
    if pool is not None:
        pool.close()
    summary = (f"# {len(_SPECS) - bad}/{len(_SPECS)} ok, {bad} failing; "
               f"{time.perf_counter() - t0:.0f} s with {a.jobs} job(s)")
    lines.append(summary)
    print(summary, flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n".join(lines) + "\n\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
