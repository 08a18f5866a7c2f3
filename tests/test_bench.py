"""Smoke test of the benchmark CLI: listing, and one tiny benchmark writing a CSV row."""
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ["date", "commit", "device", "device_type", "torch", "triton", "threads", "bench",
            "provider", "status", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "mem_method",
            "work", "work_unit", "rate", "rate_unit", "baseline", "speedup_vs_baseline"]


def _bench(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_lists_benchmarks():
    from bench import BENCHMARKS
    p = _bench()
    assert p.returncode == 0, p.stderr
    for name in BENCHMARKS:
        assert name in p.stdout
    for name in ("attention", "logprob", "kl", "gae", "steps"):
        assert name in BENCHMARKS


def test_unknown_benchmark_is_an_error():
    p = _bench("nope")
    assert p.returncode == 2
    assert "unknown benchmark" in p.stderr


def test_gae_tiny_writes_csv_row(tmp_path):
    p = _bench("gae", "--quick", "--device", "cpu", "--results-dir", str(tmp_path),
               env={"BENCH_TINY": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    rows = list(csv.DictReader(open(tmp_path / "gae.csv")))
    assert rows, "no rows written"
    for col in REQUIRED:
        assert col in rows[0], col
    by = {r["provider"]: r for r in rows}
    assert {"loop", "torch"} <= set(by)
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["median_ms"]) > 0
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert r["device_type"] == "cpu" and r["bench"] == "gae" and r["commit"]
        assert r["baseline"] == "loop" and float(r["speedup_vs_baseline"]) > 0
        assert float(r["max_abs_err"]) < 1e-4
    assert float(by["loop"]["speedup_vs_baseline"]) == 1.0
    # a second run appends under the same header
    p = _bench("gae", "--tiny", "--device", "cpu", "--results-dir", str(tmp_path), "--providers", "loop")
    assert p.returncode == 0, p.stderr
    rows2 = list(csv.DictReader(open(tmp_path / "gae.csv")))
    assert len(rows2) == len(rows) + 1
