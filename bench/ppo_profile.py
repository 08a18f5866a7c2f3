"""Where one PPO iteration of recipes.ppo spends its time, from torch.profiler.

    python -m bench ppo_profile --threads 1

Same models, shapes and settings as `python -m bench ppo_vs_trl` (tiny preset, random weights,
batch 64, 32 prompt + 32 response tokens, 4 epochs of one minibatch, no ptx, fp32), run by that
benchmark's worker in a subprocess: one warm-up iteration, then one iteration under
torch.profiler (CPU activities). The recipe marks four regions with record_function:
ppo/generate, ppo/experience, ppo/policy_update, ppo/value_update; "other" is the rest of the
iteration (KL controller, EMA, logging). Per region:
  wall       time inside the region (all its calls) in the profiled iteration
  gemm       self time of GEMM operators (aten::mm / addmm / bmm / baddbmm / mv / addmv)
  attention  self time of the SDPA kernels (aten::*scaled_dot_product*, *flash_attention*)
  engine     self time of the engine's C++ ops (engine_ops::*, their autograd kernels)
  other_ops  self time of every other operator (aten::*, prims::*)
  overhead   wall - all operator time: Python, the dispatcher, autograd bookkeeping, and the
             profiler's own cost (it inflates this column; compare regions, not absolutes)
Operator self times partition the time spent inside operators, so the columns add up to wall.
CPU only: on CUDA, operator events would measure kernel launches, not kernels.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

DESCRIPTION = "torch.profiler split of one recipes.ppo iteration (ppo_vs_trl shapes)"
REGIONS = ("ppo/generate", "ppo/experience", "ppo/policy_update", "ppo/value_update")
COLUMNS = ("gemm", "attention", "engine", "other_ops")
GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::addmv",
        "aten::addmm_"}


def category(name: str) -> str | None:
    """Operator category of a profiler event name, None for non-operator ranges."""
    if name in GEMM:
        return "gemm"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if "engine_ops" in name or "engine_triton" in name:
        return "engine"
    if name.startswith(("aten::", "prims::")):
        return "other_ops"
    return None


def split(events, total_us: float) -> dict:
    """{region: {"wall", "calls", *COLUMNS, "overhead"}} in ms, plus "other" (the iteration's
    time outside the regions) and "iteration", from profiler FunctionEvents (with their tree)."""
    out = {r: {"wall": 0.0, "calls": 0, **dict.fromkeys(COLUMNS, 0.0)} for r in REGIONS}
    for ev in events:
        if ev.name not in out:
            continue
        r = out[ev.name]
        r["wall"] += ev.cpu_time_total
        r["calls"] += 1
        stack = list(ev.cpu_children)
        while stack:
            c = stack.pop()
            cat = category(c.name)
            if cat is not None:
                r[cat] += c.self_cpu_time_total
            stack.extend(c.cpu_children)
    for r in out.values():
        r["overhead"] = r["wall"] - sum(r[c] for c in COLUMNS)
        for k in ("wall", "overhead", *COLUMNS):
            r[k] /= 1e3
    inside = sum(r["wall"] for r in out.values())
    out["other"] = {"wall": total_us / 1e3 - inside, "calls": 1}
    out["iteration"] = {"wall": total_us / 1e3, "calls": 1}
    return out


def start():
    """Start a CPU profiler; returns stop() -> split() of what ran in between."""
    import time

    import torch
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    prof.start()
    t0 = time.perf_counter()

    def stop():
        total = (time.perf_counter() - t0) * 1e6
        prof.stop()
        return split(prof.events(), total)
    return stop


def run(run):
    from .ppo_vs_trl import _spawn, shapes
    if run.device != "cpu":
        print("ppo_profile: a CPU profile (--device cpu); skipped on", run.device)
        return
    import torch
    sh = {**shapes(run), "iters": 1}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        res = _spawn("ours", sys.executable, sh, threads, 0, Path(tmp) / "p.json", timeout=1800,
                     extra=["--profile"])
    prof = res["profile"]
    case = {"preset": "tiny", **{k: sh[k] for k in ("batch", "prompt_len", "resp_len", "epochs",
                                                    "minibatches", "temperature")}}
    it = prof["iteration"]["wall"]
    rows = []
    for region in (*REGIONS, "other", "iteration"):
        r = prof[region]
        row = {**case, "provider": "engine", "status": "ok", "region": region, "calls": r["calls"],
               "wall_ms": r["wall"], "frac_of_iteration": r["wall"] / it, "threads_used": threads}
        row.update({f"{c}_ms": r[c] for c in (*COLUMNS, "overhead") if c in r})
        rows.append(row)
    run.rows += rows
    run.write(rows)
    print("\nppo_profile: one iteration, ms (share of the region)")
    print(f"  {'region':<18} {'wall':>8} " + " ".join(f"{c:>16}" for c in (*COLUMNS, "overhead")))
    for row in rows:
        cells = " ".join(f"{row[c + '_ms']:8.0f} ({row[c + '_ms'] / max(row['wall_ms'], 1e-9) * 100:3.0f}%)"
                         if c + "_ms" in row else " " * 16 for c in (*COLUMNS, "overhead"))
        print(f"  {row['region']:<18} {row['wall_ms']:8.0f} {cells}")
