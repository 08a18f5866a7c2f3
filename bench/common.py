"""Shared machinery of the benchmarks: timing, peak memory, environment, CSV rows, tables, plots.

Timing (`time_fn`): every provider of a case runs on the same inputs in the same process.
  cuda  triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])  -> median, p20, p80 in ms
  cpu   torch.utils.benchmark.Timer(...).blocked_autorange(min_run_time) with the process's
        thread count; quantiles over the per-block times (at least 5 samples).
Peak memory (`peak_mem`): what one call of fn adds on top of what was allocated before it.
  cuda  torch.cuda.max_memory_allocated() after reset_peak_memory_stats, minus the
        memory_allocated() before the call                      mem_method = cuda_max_alloc_delta
  cpu   peak resident set size delta of this process: glibc malloc_trim(0) returns free heap
        pages to the OS, /proc/self/clear_refs "5" resets VmHWM, then VmHWM after the call
        minus VmRSS before it (no tracemalloc; includes allocator/MKL scratch; page granular)
                                                                mem_method = cpu_rss_hwm_delta
Rows: one per (case, provider), appended to <results>/<bench>.csv as soon as measured, with the
device name (CPU model from /proc/cpuinfo or torch.cuda.get_device_name), torch / triton
versions, thread count, `git rev-parse --short HEAD` (+ "-dirty" when the tree differs) and the
UTC date.
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"

# Dense bf16 tensor-core peaks for MFU (notes/anchors-perf.md sec. 0); matched on the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}

# Columns every row has, in this order; a benchmark's own case / metric columns follow.
ENV_COLS = ["date", "commit", "device", "device_type", "torch", "triton", "threads", "bench", "cmd"]
RESULT_COLS = ["provider", "status", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "mem_method",
               "work", "work_unit", "rate", "rate_unit", "baseline", "speedup_vs_baseline",
               "mem_ratio_vs_baseline"]


# ----------------------------------------------------------------------------- environment

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()} ({os.cpu_count()} cpus)"


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:  # noqa: BLE001 - not installed or broken: just report it
        return "none"


def peak_tflops(device: str) -> float | None:
    """Dense bf16 peak of the device from PEAK_BF16_TFLOPS, None when unknown (CPU: None)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    for key, v in PEAK_BF16_TFLOPS.items():
        if key in name:
            return v
    return None


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- timing

def time_fn(fn, device: str, *, min_run_time: float = 0.2, warmup_ms: int = 25, rep_ms: int = 100):
    """(median_ms, p20_ms, p80_ms) of fn(); fn is called once before (compilation, caches)."""
    fn()
    sync(device)
    if device == "cuda":
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                                quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    from torch.utils.benchmark import Timer
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < 5:  # slow calls: blocked_autorange may return a single block
        times.append(timer.timeit(1).times[0])
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(times) * 1e3, q[1] * 1e3, q[7] * 1e3


def time_calls(fn, device: str, n: int):
    """Wall times (s) of n separate calls of fn(), each synchronized (for multi-phase steps)."""
    out = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def quantiles_ms(times_s):
    """(median, p20, p80) in ms of a list of seconds."""
    if len(times_s) == 1:
        t = times_s[0] * 1e3
        return t, t, t
    q = statistics.quantiles(times_s, n=10, method="inclusive")
    return statistics.median(times_s) * 1e3, q[1] * 1e3, q[7] * 1e3


# ----------------------------------------------------------------------------- peak memory

_libc = None


def _malloc_trim():
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_kb(key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else -1


def cpu_mem_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kb("VmHWM") >= 0
    except OSError:
        return False


def peak_mem(fn, device: str, *, total: bool = False):
    """(peak_bytes, method) of one call of fn(); see the module docstring. total=True on CUDA:
    the absolute max_memory_allocated (weights and optimizer state included)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return (peak, "cuda_max_alloc_total") if total else (peak - base, "cuda_max_alloc_delta")
    if not cpu_mem_supported():
        fn()
        return None, "n/a"
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_kb("VmRSS")
    fn()
    hwm = _proc_status_kb("VmHWM")
    return max(0, hwm - before) * 1024, "cpu_rss_hwm_delta"


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device: str):
    import gc
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- run context

class Run:
    """One benchmark invocation: options, environment, CSV output and the printed table."""

    def __init__(self, bench: str, *, device: str, quick: bool, tiny: bool, plot: bool,
                 results_dir: Path, providers: list[str] | None = None):
        self.bench, self.device, self.quick, self.tiny, self.plot = bench, device, quick, tiny, plot
        self.results_dir = Path(results_dir)
        self.providers = providers
        self.min_run_time = 0.02 if tiny else 0.2
        self.env = {
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": git_commit(),
            "device": device_name(device),
            "device_type": device,
            "torch": torch.__version__,
            "triton": triton_version(),
            "threads": torch.get_num_threads() if device == "cpu" else "",
            "bench": bench,
            "cmd": "python -m bench " + " ".join(sys.argv[1:]),
        }
        self.rows: list[dict] = []

    def want(self, provider: str) -> bool:
        return self.providers is None or provider in self.providers

    # -- measuring one provider -------------------------------------------------------------
    def measure(self, case: dict, provider: str, fn, *, work: float | None, work_unit: str,
                rate_unit: str, mem: bool = True, extra: dict | None = None) -> dict:
        """Time fn (and its peak memory); append the row. Failures become a row with a status."""
        row = {**case, "provider": provider, "status": "ok", "work": _fmt(work),
               "work_unit": work_unit, "rate_unit": rate_unit, **(extra or {})}
        try:
            med, p20, p80 = time_fn(fn, self.device, min_run_time=self.min_run_time,
                                    warmup_ms=10, rep_ms=20 if self.tiny else 50)
            row.update(median_ms=med, p20_ms=p20, p80_ms=p80)
            if mem:
                peak, method = peak_mem(fn, self.device)
                row.update(peak_mem_mb=None if peak is None else peak / 2**20, mem_method=method)
            if work is not None and med > 0:
                row["rate"] = rate(work, med, rate_unit)
        except Exception as e:  # noqa: BLE001 - one failing provider must not stop the sweep
            row["status"] = "oom" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:160]}"
            row["status"] = row["status"].replace("\n", " ")
        free_memory(self.device)
        return self.add(row)

    def skip(self, case: dict, provider: str, why: str) -> dict:
        return self.add({**case, "provider": provider, "status": f"skipped: {why}"})

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self._print(row)
        return row

    # -- ratios, CSV ------------------------------------------------------------------------
    def finish_case(self, case_rows: list[dict], baseline: str | None):
        """Fill baseline / ratio columns of the rows of one case, then append them to the CSV."""
        base = next((r for r in case_rows if r["provider"] == baseline and r["status"] == "ok"), None)
        for r in case_rows:
            r["baseline"] = baseline or ""
            if base is not None and r["status"] == "ok":
                r["speedup_vs_baseline"] = base["median_ms"] / r["median_ms"]
                if r.get("peak_mem_mb") and base.get("peak_mem_mb"):
                    r["mem_ratio_vs_baseline"] = r["peak_mem_mb"] / base["peak_mem_mb"]
        self.write(case_rows)

    def write(self, rows: list[dict]):
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.results_dir / f"{self.bench}.csv"
        rows = [{**self.env, **{k: _fmt(v) for k, v in r.items()}} for r in rows]
        cols = list(ENV_COLS)
        for r in rows:
            for k in r:
                if k not in cols and k not in RESULT_COLS:
                    cols.append(k)
        cols += RESULT_COLS
        old_rows, old_cols = [], None
        if path.exists() and path.stat().st_size:
            with open(path, newline="") as f:
                rd = csv.DictReader(f)
                old_cols = rd.fieldnames
                if old_cols and not set(cols) <= set(old_cols):
                    old_rows = list(rd)
        if old_cols is not None and set(cols) <= set(old_cols):
            with open(path, "a", newline="") as f:  # plain append under the existing header
                csv.DictWriter(f, fieldnames=old_cols, restval="").writerows(rows)
            return
        if old_cols:  # a new column appeared: rewrite the file under the union header
            cols = list(old_cols) + [c for c in cols if c not in old_cols]
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, restval="")
            w.writeheader()
            w.writerows(old_rows)
            w.writerows(rows)
        os.replace(tmp, path)

    def _print(self, r: dict):
        keys = [k for k in r if k not in RESULT_COLS and k not in ENV_COLS]
        case = " ".join(f"{k}={_short(r[k])}" for k in keys if r[k] not in (None, ""))
        if r["status"] != "ok":
            print(f"  {case:<58} {r['provider']:<16} {r['status']}", flush=True)
            return
        mem = r.get("peak_mem_mb")
        mem_s = f"{mem:9.1f} MB" if isinstance(mem, float) else "        n/a"
        rt = r.get("rate")
        rate_s = f"{rt:9.2f} {r['rate_unit']}" if isinstance(rt, float) else ""
        print(f"  {case:<58} {r['provider']:<16} {r['median_ms']:10.3f} ms "
              f"[{r['p20_ms']:.3f}, {r['p80_ms']:.3f}] {mem_s} {rate_s}", flush=True)

    def summary(self, key_cols: list[str], baseline: str):
        """Print, per case, each provider's speedup and memory ratio vs the baseline."""
        print(f"\n{self.bench}: speedup vs {baseline} (x, >1 = faster) / peak memory ratio")
        for r in self.rows:
            if r.get("speedup_vs_baseline") is None or r["provider"] == r.get("baseline"):
                continue
            case = " ".join(f"{k}={r[k]}" for k in key_cols if k in r)
            mr = r.get("mem_ratio_vs_baseline")
            print(f"  {case:<58} {r['provider']:<16} {r['speedup_vs_baseline']:8.2f}x"
                  + (f"   mem {mr:.3f}" if mr is not None else ""))


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def rate(work: float, ms: float, unit: str) -> float:
    scale = {"TFLOP/s": 1e12, "GFLOP/s": 1e9, "GB/s": 1e9, "tokens/s": 1.0}[unit]
    return work / (ms * 1e-3) / scale


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return ""
        return float(f"{v:.6g}")
    return v


def plot_sweep(run: Run, *, x: str, series: list[str], facets: list[str], y: str = "rate",
               ylabel: str | None = None, logx: bool = True):
    """PNG of y vs x, one line per (provider, *series), one panel per value of `facets`."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install -e .[plot])", file=sys.stderr)
        return None
    rows = [r for r in run.rows if r["status"] == "ok" and isinstance(r.get(y), (int, float))]
    if not rows:
        return None
    def order(t):
        return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in t)
    panels = sorted({tuple(r.get(f) for f in facets) for r in rows}, key=order)
    n = len(panels)
    cols = min(n, 4)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.4 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, p in zip(axes.flat, panels):
        sub = [r for r in rows if tuple(r.get(f) for f in facets) == p]
        for key in sorted({(r["provider"],) + tuple(r.get(s) for s in series) for r in sub}, key=str):
            pts = sorted((r[x], r[y]) for r in sub
                         if (r["provider"],) + tuple(r.get(s) for s in series) == key)
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=" ".join(map(str, key)))
        ax.set_title(" ".join(f"{f}={v}" for f, v in zip(facets, p)), fontsize=8)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel or y)
        if logx:
            ax.set_xscale("log", base=2)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{run.bench} on {run.env['device']} ({run.env['commit']}, {run.env['date'][:10]})",
                 fontsize=9)
    fig.tight_layout()
    out = run.results_dir / f"{run.bench}_{run.device}.png"
    run.results_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"plot: {out}")
    return out


@contextlib.contextmanager
def no_grad_if(flag: bool):
    with (torch.no_grad() if flag else contextlib.nullcontext()):
        yield


def dumps(d: dict) -> str:
    return json.dumps(d, sort_keys=True)
