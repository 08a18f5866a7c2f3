"""torchrun integration: process-group init, rank-0 logging, seeding, sharding, model wrapping.

    torchrun --nproc_per_node 8 -m recipes.sft --config recipes/configs/sft_gpt3_1.3b.toml

Without torchrun's environment everything degrades to a single process and no process group.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as tdist


def is_dist() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_dist() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kw) -> None:
    if is_main():
        print(*args, **kw, flush=True)


def init(device: str = "") -> torch.device:
    """Init the process group from torchrun's env (NCCL on CUDA, gloo on CPU); pick the device.

    Also limits CPU threads to cores // local processes: oversubscribed CPU ranks run many times
    slower, not just 2x.
    """
    if not device:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    n_local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_local))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_dist():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank())
        tdist.init_process_group(backend=backend)
    if device.startswith("cuda"):
        return torch.device("cuda", local_rank() if device == "cuda" else torch.device(device).index)
    return torch.device(device)


def shard(items: int, r: int | None = None, w: int | None = None) -> range:
    """Contiguous split of range(items) for rank r of w, so each item is seen once per epoch."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    per = items // w
    return range(r * per, (r + 1) * per)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if is_dist():
        x = x.clone()
        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
        x /= world_size()
    return x


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from all ranks along dim 0 (rank order)."""
    if not is_dist():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    tdist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def wrap(model: torch.nn.Module, strategy: str = "ddp", device=None):
    """DDP or FSDP2 (fully_shard) wrapping; identity in a single process."""
    if not is_dist():
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device is not None and device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in getattr(model, "h", []):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"dist.strategy={strategy!r}: expected ddp or fsdp")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def cleanup() -> None:
    if is_dist():
        tdist.destroy_process_group()
