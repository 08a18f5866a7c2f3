"""CLI: python -m bench [<name>|all] [--quick] [--device cpu|cuda] [--plot] [...]."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from . import BENCHMARKS, COMMANDS


def _list():
    print("benchmarks (python -m bench <name> [--quick] [--device cpu|cuda] [--plot]):")
    for name, (_, desc) in BENCHMARKS.items():
        print(f"  {name:<10} {desc}")
    print("  all        every benchmark above, in this order")
    for name, (_, desc) in COMMANDS.items():
        print(f"  {name:<10} {desc}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("name", nargs="?", help="benchmark name, or 'all'")
    p.add_argument("--quick", action="store_true", help="small shapes (minutes on a CPU)")
    p.add_argument("--tiny", action="store_true",
                   help="smallest shapes and few repetitions (smoke tests); also BENCH_TINY=1")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--plot", action="store_true", help="write <results>/<name>_<device>.png")
    p.add_argument("--results-dir", default=os.environ.get("BENCH_RESULTS_DIR"),
                   help="where the CSVs go (default bench/results; env BENCH_RESULTS_DIR)")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset of providers to run (default: all available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    a = p.parse_args(argv)
    if a.name is None:
        _list()
        return 0
    names = list(BENCHMARKS) if a.name == "all" else [a.name]
    bad = [n for n in names if n not in BENCHMARKS]
    if bad:
        print(f"unknown benchmark {bad[0]!r}", file=sys.stderr)
        _list()
        return 2

    import torch

    from .common import DEFAULT_RESULTS, Run
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    tiny = a.tiny or os.environ.get("BENCH_TINY", "0") == "1"
    results = Path(a.results_dir) if a.results_dir else DEFAULT_RESULTS
    providers = a.providers.split(",") if a.providers else None
    failed = []
    for name in names:
        mod = importlib.import_module(BENCHMARKS[name][0])
        run = Run(name, device=device, quick=a.quick or tiny, tiny=tiny, plot=a.plot,
                  results_dir=results, providers=providers)
        print(f"== {name} on {run.env['device']} | torch {run.env['torch']} triton "
              f"{run.env['triton']} | commit {run.env['commit']} | {run.env['date']}"
              f"{' | threads ' + str(run.env['threads']) if device == 'cpu' else ''}"
              f"{' | quick' if run.quick else ''}{' | tiny' if tiny else ''}", flush=True)
        t0 = time.perf_counter()
        try:
            mod.run(run)
        except Exception as e:  # noqa: BLE001 - keep going with the next benchmark under `all`
            import traceback
            traceback.print_exc()
            failed.append(f"{name}: {type(e).__name__}: {e}")
        print(f"== {name}: {len(run.rows)} rows -> {results / (name + '.csv')} "
              f"({time.perf_counter() - t0:.1f} s)\n", flush=True)
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
