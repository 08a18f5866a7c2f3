"""Running recipes as subprocesses in tests (shared by test_dist.py and test_faults.py)."""
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# Tiny and fast: every rank single-threaded (2 shared cores), no C++ build.
TINY = ["--data.seq_len=32", "--train.threads=1", "--train.progress=false", "--train.eval_every=0"]


def env(**extra) -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "ENGINE_NO_CSRC": "1", "PYTHONUNBUFFERED": "1"}
    e.pop("ENGINE_INJECT_NAN_STEP", None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def cmd(stage: str, out, args, nproc: int = 1) -> list:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
              if nproc > 1 else [sys.executable])
    return launch + ["-m", f"recipes.{stage}", "--out", str(out), *TINY, *args]
