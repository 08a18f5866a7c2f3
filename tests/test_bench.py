"""Smoke tests of the benchmark CLI (listing, one tiny benchmark writing a CSV row), the ceilings
and per-kernel GPU check at smoke sizes, both gpu_suite.sh dry-runs, and ppo_vs_trl (its skip
path without trl, as in CI; a tiny run of both sides where trl is importable)."""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


# ----------------------------------------------------------------------------- ceilings, gpu_check

def test_ceilings_tiny_rows(tmp_path):
    p = _bench("ceilings", "--tiny", "--device", "cpu", "--results-dir", str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {r["op"]: r for r in csv.DictReader(open(tmp_path / "ceilings.csv"))}
    assert set(rows) == {"matmul", "copy"}
    for r in rows.values():
        assert r["status"] == "ok" and float(r["median_ms"]) > 0 and float(r["rate"]) > 0, r
    n = int(rows["matmul"]["shape"].split("x")[0])
    assert float(rows["matmul"]["work"]) == pytest.approx(2 * n ** 3, rel=1e-5)  # CSV keeps 6 digits
    assert rows["matmul"]["rate_unit"] == "TFLOP/s"
    # rate = work / time: the row's own numbers must agree
    assert abs(float(rows["copy"]["rate"]) - float(rows["copy"]["work"]) / float(rows["copy"]["median_ms"]) / 1e6) \
        < 1e-3 * float(rows["copy"]["rate"])


def test_gpu_check_kernels_tiny_on_cpu(tmp_path):
    """The suite's per-kernel timing, at smoke shapes through the Triton interpreter: every kernel
    runs, agrees with its baseline and gets a ratio."""
    p = subprocess.run([sys.executable, "-m", "bench.gpu_check", "kernels", "--tiny", "--results-dir",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    rows = list(csv.DictReader(open(tmp_path / "gpu_check.csv")))
    cases = {(r["op"], r.get("mask", ""), r["provider"]) for r in rows}
    assert {("gae", "", "loop"), ("gae", "", "triton"), ("linear_logprobs", "", "ours"),
            ("linear_kl", "", "ours"), ("attention", "causal", "ours"), ("attention", "banded", "ours")} <= cases
    for r in rows:
        assert r["status"] == "ok", r
        if r["provider"] != r["baseline"]:
            assert float(r["max_abs_diff"]) < 1e-4, r
            assert float(r["speedup_vs_baseline"]) > 0
    assert subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, capture_output=True).returncode == 2


# ----------------------------------------------------------------------------- gpu_suite.sh

def _dry_run(mode, **env):
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), mode, "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert p.returncode == 0, p.stdout + p.stderr
    steps = [re.match(r"^\s+\[\s*(\d+) s\] ([\w-]+): (.*)$", line) for line in p.stdout.splitlines()]
    steps = [(int(m.group(1)), m.group(2), m.group(3)) for m in steps if m]
    total = int(re.search(r"^total cap: (\d+) s$", p.stdout, re.M).group(1))
    return steps, total, p.stdout


@pytest.mark.parametrize("mode", ["check", "bench"])
def test_gpu_suite_dry_run_fits_four_minutes(mode, tmp_path):
    out = tmp_path / "out"
    steps, total, text = _dry_run(mode, OUT=str(out))
    assert steps and sum(c for c, _, _ in steps) == total <= 240, text
    for cap, label, cmd in steps:
        assert cap > 0
        assert cmd.startswith("python3 "), cmd            # the GPU machine has no `python`
        assert not re.search(r"(^|\s)python(\s|$)", cmd), cmd
        assert "compile" not in cmd, cmd                  # no cold torch.compile provider
        for d in re.findall(r"--(?:results-dir|junitxml)[ =](\S+)", cmd):
            assert d.startswith(str(out)), cmd            # everything it writes goes under $OUT
    assert "TRITON_INTERPRET=0" in text
    cmds = " | ".join(cmd for _, _, cmd in steps)
    if mode == "check":
        assert {"env", "ceilings", "gpu-tests", "kernel-tests", "kernel-timings"} <= {s for _, s, _ in steps}
        for f in ("test_attention.py", "test_logprob.py", "test_kl.py", "test_gae.py", "test_cpp_ops.py"):
            assert f in cmds
    else:
        from bench import BENCHMARKS
        for name in set(BENCHMARKS) - {"ppo_vs_trl", "ppo_profile", "ceilings"}:  # CPU-only / by check
            assert re.search(rf"bench(\.gpu_check bench)? {name} --device cuda", cmds), name
        assert "bench.report" in cmds
    # files under $OUT: the log, a CSV per benchmark step, gpu_tests.xml / README.md: at most 8
    n_files = 1 + sum(1 for _, _, c in steps if "--results-dir" in c and "bench.report" not in c) + 1
    assert n_files <= 8


def test_gpu_suite_refuses_unknown_arguments():
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "everything"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown argument" in p.stderr


# ----------------------------------------------------------------------------- ppo_vs_trl

def _trl_importable():
    from bench.ppo_vs_trl import trl_python, trl_status
    return trl_status(trl_python())[0]


@pytest.mark.parametrize("interp", ["missing", "this"])
def test_ppo_vs_trl_skips_without_trl(interp, tmp_path):
    """CI has no trl: the benchmark says how to install it, exits 0 and writes no row."""
    if interp == "this":
        from bench.ppo_vs_trl import trl_status
        if trl_status(sys.executable)[0]:
            pytest.skip("trl is importable here")
        py = sys.executable
    else:
        py = str(tmp_path / "no-such-venv" / "bin" / "python")
    p = _bench("ppo_vs_trl", "--tiny", "--device", "cpu", "--results-dir", str(tmp_path),
               env={"BENCH_TRL_PYTHON": py})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ppo_vs_trl skipped: trl is not importable" in p.stdout
    assert "trl==1.12.0" in p.stdout and "BENCH_TRL_PYTHON=" in p.stdout
    assert not (tmp_path / "ppo_vs_trl.csv").exists()


def test_ppo_vs_trl_tiny_runs_both_sides(tmp_path):
    if not _trl_importable():
        pytest.skip("trl not importable (set BENCH_TRL_PYTHON to a venv with trl==1.12.0)")
    p = _bench("ppo_vs_trl", "--tiny", "--device", "cpu", "--threads", "1", "--results-dir", str(tmp_path),
               timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {r["provider"]: r for r in csv.DictReader(open(tmp_path / "ppo_vs_trl.csv"))}
    assert set(rows) == {"engine", "trl"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["threads_used"] == "1" and r["threads"] == "1"
        assert r["rate_unit"] == "episodes/s"
        assert abs(float(r["rate"]) - int(r["batch"]) / (float(r["median_ms"]) / 1e3)) < 1e-3 * float(r["rate"])
        # both sides generated the full response length in every timed iteration
        assert set(r["gen_tokens"].split("/")) == {r["resp_len"]}
        split = [float(r[f"{k}_ms"]) for k in ("gen", "score", "train", "other")]
        assert all(x >= 0 for x in split) and split[0] > 0 and split[2] > 0
        assert abs(sum(float(r[f"{k}_frac"]) for k in ("gen", "score", "train", "other")) - 1) < 1e-3
    assert "trl 1.12" in rows["trl"]["impl"] and rows["engine"]["impl"] == "recipes.ppo"
    ratio = float(rows["trl"]["median_ms"]) / float(rows["engine"]["median_ms"])
    assert abs(float(rows["engine"]["speedup_vs_baseline"]) - ratio) < 1e-3 * ratio
    assert rows["trl"]["baseline"] == "trl" and float(rows["trl"]["speedup_vs_baseline"]) == 1.0
    assert float(rows["engine"]["paired_ratio_median"]) == pytest.approx(ratio, rel=1e-3)  # one round


# ----------------------------------------------------------------------------- ppo_profile

def test_ppo_profile_split_partitions_each_region():
    from types import SimpleNamespace as E

    from bench.ppo_profile import REGIONS, split

    def ev(name, total, self_t, kids=()):
        return E(name=name, cpu_time_total=total, self_cpu_time_total=self_t, cpu_children=list(kids))
    mm = ev("aten::mm", 500, 500)
    lin = ev("aten::linear", 620, 20, [ev("aten::t", 5, 5), mm])
    bwd = ev("autograd::engine::evaluate_function: MmBackward0", 400, 30,
             [ev("aten::mm", 300, 300), ev("engine_ops::gelu_tanh_bwd", 70, 70)])
    sdpa = ev("aten::scaled_dot_product_attention", 200, 10,
              [ev("aten::_scaled_dot_product_flash_attention_for_cpu", 190, 190)])
    upd = ev("ppo/policy_update", 1500, 280, [lin, bwd, sdpa])
    gen = ev("ppo/generate", 100, 100)
    out = split([gen, upd, lin, mm, bwd, sdpa], total_us=2000)
    u = out["ppo/policy_update"]
    assert u["calls"] == 1 and u["wall"] == 1.5
    assert u["gemm"] == 0.8 and u["attention"] == 0.2 and u["engine"] == 0.07
    assert u["other_ops"] == pytest.approx(0.025)              # linear's and t's own time
    assert u["overhead"] == pytest.approx(1.5 - 0.8 - 0.2 - 0.07 - 0.025)
    assert out["ppo/generate"]["overhead"] == 0.1            # no operator inside
    assert out["other"]["wall"] == pytest.approx(2.0 - 1.5 - 0.1) and out["iteration"]["wall"] == 2.0
    assert set(REGIONS) <= set(out)


def test_ppo_profile_tiny_runs_the_recipe(tmp_path):
    p = _bench("ppo_profile", "--tiny", "--device", "cpu", "--threads", "1", "--results-dir", str(tmp_path),
               timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {r["region"]: r for r in csv.DictReader(open(tmp_path / "ppo_profile.csv"))}
    regions = ("ppo/generate", "ppo/experience", "ppo/policy_update", "ppo/value_update")
    assert set(rows) == {*regions, "other", "iteration"}
    it = float(rows["iteration"]["wall_ms"])
    assert sum(float(rows[r]["wall_ms"]) for r in (*regions, "other")) == pytest.approx(it, abs=0.01)  # CSV rounding
    for r in regions:
        row = {k: float(rows[r][k]) for k in ("wall_ms", "gemm_ms", "attention_ms", "engine_ms",
                                              "other_ops_ms", "overhead_ms")}
        assert row["wall_ms"] > 0 and int(rows[r]["calls"]) >= 1
        parts = sum(row[f"{c}_ms"] for c in ("gemm", "attention", "engine", "other_ops", "overhead"))
        assert parts == pytest.approx(row["wall_ms"], abs=0.01)
        assert row["gemm_ms"] > 0 and row["overhead_ms"] > -1e-3
    assert float(rows["ppo/policy_update"]["attention_ms"]) > 0
