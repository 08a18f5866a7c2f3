"""Ceilings of the device the other benchmarks ran on: what a large matmul and a plain copy reach.

  matmul  torch.matmul of two square [n, n] matrices (CUDA: bf16, n = 8192; CPU: fp32, n = 1024),
          work 2 n^3 FLOP -> TFLOP/s, and on a GPU with a known peak (bench.common.PEAK_BF16_TFLOPS)
          the fraction of it. A kernel's TFLOP/s reads against this number, not the datasheet.
  copy    dst.copy_(src) of one contiguous buffer (CUDA: 2 GiB; CPU: 256 MiB), work = bytes read +
          bytes written -> GB/s: the memory-bound ceiling for GAE, KL and the logprob epilogues.
"""
import torch

from .common import peak_tflops

DESCRIPTION = "device ceilings: large matmul TFLOP/s, device copy GB/s"


def sizes(run):
    """(matmul n, copy bytes)"""
    if run.tiny:
        return 256, 8 * 2**20
    if run.device == "cuda":
        return (4096, 2**30) if run.quick else (8192, 2 * 2**30)
    return (512, 64 * 2**20) if run.quick else (1024, 256 * 2**20)


def run(run):
    dev = run.device
    n, nbytes = sizes(run)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32  # CPU bf16 GEMM is not the CPU's ceiling
    peak = peak_tflops(dev)
    if run.want("matmul"):
        g = torch.Generator(device=dev).manual_seed(0)
        a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
        b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
        case = {"op": "matmul", "shape": f"{n}x{n}x{n}", "dtype": str(dtype).replace("torch.", "")}
        row = run.measure(case, "matmul", lambda: torch.matmul(a, b), work=2.0 * n ** 3,
                          work_unit="FLOP", rate_unit="TFLOP/s", mem=False)
        if peak and row["status"] == "ok":
            row["peak_tflops"], row["frac_of_peak"] = peak, row["rate"] / peak
        run.finish_case([row], None)
        del a, b
    if run.want("copy"):
        src = torch.ones(nbytes // 4, device=dev, dtype=torch.float32)
        dst = torch.empty_like(src)
        case = {"op": "copy", "shape": f"{nbytes // 2**20} MiB", "dtype": "float32"}
        row = run.measure(case, "copy", lambda: dst.copy_(src), work=2 * nbytes, work_unit="bytes",
                          rate_unit="GB/s", mem=False)
        run.finish_case([row], None)
        del src, dst
