"""bench aot: kernels compile for sm_90 on this CPU machine with Triton's own compiler and fit.

The quick test compiles the most used 16-bit training configs (about a minute on 2 cores); the
full check of every shipped config (`python -m bench aot`, about 20-40 minutes on 2 cores, output
in bench/results/aot_sm90.txt) is marked slow and opt-in:
`ENGINE_AOT_FULL=1 python -m pytest -m slow tests/test_aot.py`.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
triton = pytest.importorskip("triton")

QUICK = ",".join([
    "attn_fwd D64 bf16 causal train",
    "attn_fwd D128 bf16 band+seg train",
    "attn_bwd_dkdv D64 bf16 causal train DQ_ATOMIC=True",
    "logprob_bwd_dz bf16 N-large BN128 BV128 BK64 HAS_ENT=False",
    "kl_fwd bf16 N-large",
])


def _aot(*args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "bench", "aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_specialization_matches_the_jit():
    """Pointers and multiples of 16 are marked divisible, ints equal to 1 become constants."""
    from bench import aot
    spec = next(s for s in aot.all_specs() if s.kernel == "attn_fwd")
    sig, const, attrs = aot._signature(spec)
    names = [p.name for p in aot.params(spec.fn)]
    assert sig["Q"].startswith("*") and attrs[(names.index("Q"),)] == [["tt.divisibility", 16]]
    assert sig["sqd"] == "constexpr" and const["sqd"] == 1          # unit stride
    assert sig["qk_mul"] == "fp32" and const["BLOCK_M"] == spec.args["BLOCK_M"]
    assert (names.index("sqt"),) in attrs                             # D = 16k


def test_every_table_entry_has_a_spec():
    import importlib
    from bench import aot
    A = importlib.import_module("kernels.attention")
    from kernels import kl, logprob
    specs = aot.all_specs()
    kernels_seen = {s.kernel for s in specs}
    assert {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_delta", "logprob_fwd",
            "logprob_bwd_dz", "kl_fwd", "kl_bwd_dz", "gae"} <= kernels_seen
    n_fwd = sum(s.kernel == "attn_fwd" and "+seg" not in s.config for s in specs)
    assert n_fwd == len(A.FWD_CONFIGS)
    assert sum(s.kernel == "logprob_fwd" for s in specs) == 2 * len(logprob.FWD_CONFIGS)
    assert sum(s.kernel == "kl_fwd" for s in specs) == len(kl.KL_FWD_CONFIGS)


def test_quick_configs_compile_for_sm90_without_spills():
    p = _aot("--only", QUICK, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [ln for ln in p.stdout.splitlines() if ln and not ln.startswith("#") and "status" not in ln]
    assert len(rows) >= 5, p.stdout
    for r in rows:
        assert r.endswith(" ok") and " wgmma " in r, r


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ENGINE_AOT_FULL") != "1", reason="set ENGINE_AOT_FULL=1")
def test_all_shipped_configs_fit_sm90():
    p = _aot("--jobs", "2", timeout=3600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
