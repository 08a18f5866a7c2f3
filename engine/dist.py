"""torchrun integration: process-group init, rank-0 logging, seeding, sharding, model wrapping.

    torchrun --nproc_per_node 8 -m recipes.sft --config recipes/configs/sft_gpt3_1.3b.toml

Without torchrun's environment everything degrades to a single process and no process group.
"""
from __future__ import annotations

import contextlib
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


def seed(base: int, per_rank: bool = True) -> int:
    """Seed torch, numpy and random with base (+ rank when per_rank); returns the seed used.
    Model init wants the same seed on every rank; dropout and sampling want per_rank=True."""
    import random

    import numpy as np
    s = base + (rank() if per_rank else 0)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)
    return s


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


def _blocks(model: torch.nn.Module) -> list:
    """The transformer blocks of a GPT or of a RewardModel's trunk (the FSDP/checkpoint units)."""
    from .model import Block
    return [m for m in model.modules() if isinstance(m, Block)]


def checkpoint_activations(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute each transformer block's activations in backward (torch.utils.checkpoint):
    activation memory drops from O(layers) to O(1) blocks for about one extra forward."""
    from torch.utils.checkpoint import checkpoint
    for block in _blocks(model):
        if getattr(block, "_ckpt_wrapped", False):
            continue
        inner = block.forward

        def fwd(*args, _inner=inner, **kw):
            if not torch.is_grad_enabled():  # sampling / eval: nothing to save
                return _inner(*args, **kw)
            return checkpoint(_inner, *args, use_reentrant=False, **kw)
        block.forward = fwd
        block._ckpt_wrapped = True
    return model


def wrap(model: torch.nn.Module, strategy: str = "ddp", device=None, *,
         activation_checkpointing: bool = False, compute_dtype: torch.dtype | None = None):
    """DDP or FSDP2 (fully_shard per transformer block, then the root) around `model`.

    fsdp follows the precision policy (engine/precision.py): parameters are all-gathered in
    `compute_dtype` (default: bf16 on CUDA, fp32 on CPU; pass the run's
    precision.compute_dtype(train.dtype, device)) and gradients reduced in fp32; the fp32
    sharded parameters are the optimizer's master weights. A scalar `head` (RewardModel) is
    sharded on its own with fp32 parameters, so scores are computed in fp32. In a single
    process the model is returned as is (plus activation checkpointing when asked). Under fsdp
    the returned object is `model` itself (fully_shard changes it in place), so `model(...)`
    already runs the sharded forward.
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"dist.strategy={strategy!r}: expected ddp or fsdp")
    if activation_checkpointing:
        checkpoint_activations(model)
    if not is_dist():
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device is not None and device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    import warnings

    from torch.distributed.fsdp import fully_shard

    from .precision import compute_dtype as _policy_dtype
    from .precision import fsdp_policy
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # outputs are not modified in place
    dev_type = device.type if device is not None else next(model.parameters()).device.type
    mp = fsdp_policy(compute_dtype or _policy_dtype("auto", dev_type))
    for block in _blocks(model):
        fully_shard(block, mp_policy=mp)
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear):
        fully_shard(head, mp_policy=fsdp_policy(torch.float32))
    fully_shard(model, mp_policy=mp)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """True if any parameter is a DTensor (FSDP2)."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Unshard an FSDP2 model for code that bypasses its forward (generate(), hidden_states());
    a no-op for unsharded models."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)] if is_dist() else []
    if mods and hasattr(mods[0], "_get_fsdp_state"):
        # Make `model` the FSDP root before any block runs on its own: otherwise the first
        # block called outside the root's forward claims the root role and the next real
        # forward fails ("already been lazily initialized").
        mods[0]._get_fsdp_state()._lazy_init()
    for m in mods:
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()


def full_state_dict(model: torch.nn.Module) -> dict:
    """CPU state dict with full tensors. Collective under FSDP: call it on every rank."""
    model = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def reduce_floats(values: list[float], op: str = "mean") -> list[float]:
    """Mean (or sum / max) of each float over ranks, in float64; identity in a single process."""
    if not is_dist() or not values:
        return list(values)
    dev = "cuda" if tdist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.SUM)
    if op == "mean":
        t /= world_size()
    return t.tolist()


def barrier() -> None:
    if is_dist():
        tdist.barrier()


# ----------------------------------------------------------------------------- memory estimate
# Bytes per parameter of the training state. Weights and Adam moments are fp32 (the weights are
# the optimizer's master copy); with bf16 mixed precision FSDP also holds a bf16 copy of the
# parameters it has gathered for compute (one block at a time plus the root, not counted), and
# DDP/autocast casts on the fly. Gradients: fp32 under ddp (DDP buckets add another fp32 copy);
# fp32 shards under fsdp (reduce_dtype fp32).
BYTES = {"params": 4, "grads": 4, "adam": 8, "ddp_buckets": 4}


def memory_estimate(cfg, strategy: str = "ddp", world: int = 1) -> dict:
    """Per-GPU bytes of parameters, gradients and AdamW states for GPTConfig `cfg`.

    ddp: every rank holds everything (params 4 + grads 4 + DDP gradient buckets 4 + Adam m, v 8 =
    20 bytes/param). fsdp (FULL_SHARD): params, grads and Adam states are split over `world`
    ranks (16 bytes/param / world), plus the largest gathered unit: one transformer block's
    parameters in bf16 during forward/backward (x2 for prefetch), plus the gathered root (token
    and position embeddings + final norm) in bf16.
    Excluded: activations (batch x seq x d_model x layers; see dist.activation_checkpointing),
    temporary buffers, the CUDA context (~0.5-1 GB) and allocator fragmentation.
    """
    n = cfg.num_params()
    d, L = cfg.d_model, cfg.n_layer
    block = (cfg.num_params(embeddings=False) - d * (2 if cfg.bias else 1)) // max(L, 1)
    root = n - block * L
    if strategy == "ddp":
        parts = {"params": n * BYTES["params"], "grads": n * BYTES["grads"],
                 "ddp_buckets": n * BYTES["ddp_buckets"] if world > 1 else 0, "adam": n * BYTES["adam"]}
    elif strategy == "fsdp":
        per = -(-n // world)
        parts = {"params": per * BYTES["params"], "grads": per * BYTES["grads"], "adam": per * BYTES["adam"],
                 "gathered": (2 * block + root) * 2 if world > 1 else 0}
    else:
        raise ValueError(f"strategy {strategy!r}: expected ddp or fsdp")
    parts["total"] = sum(parts.values())
    parts["n_params"] = n
    return parts


def memory_table(presets=("gpt3-125m", "gpt3-1.3b", "gpt3-6.7b", "gpt3-175b"),
                 worlds=(1, 8, 64)) -> str:
    """Markdown table of memory_estimate (GiB per GPU) for presets x strategies x world sizes."""
    from .config import GPTConfig
    gib = 1024 ** 3
    head = "| preset | params | " + " | ".join(
        f"ddp N={w}" for w in worlds) + " | " + " | ".join(f"fsdp N={w}" for w in worlds) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(worlds))]
    for name in presets:
        cfg = GPTConfig.from_preset(name)
        cells = [f"{memory_estimate(cfg, s, w)['total'] / gib:.1f}" for s in ("ddp", "fsdp") for w in worlds]
        lines.append(f"| {name} | {cfg.num_params() / 1e9:.2f}B | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def cleanup() -> None:
    if is_dist():
        tdist.destroy_process_group()
