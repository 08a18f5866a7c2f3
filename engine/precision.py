"""The precision policy: one rule for every stage, written down here and applied from here.

    what                                   dtype
    -------------------------------------  ------------------------------------------------
    parameters (master weights)            fp32, always (also the FSDP2 shards)
    optimizer state (AdamW m, v)           fp32
    matmuls, attention, activations        bf16 when the compute dtype is bf16, else fp32
    FSDP2 all-gathered parameters          the compute dtype (MixedPrecisionPolicy.param_dtype)
    gradient reduction                     fp32 (MixedPrecisionPolicy.reduce_dtype)
    LM-head logits                         never materialised in training (fused op, tiles in
                                           the compute dtype, fp32 accumulation); sampling
                                           logits are computed in the compute dtype, then fp32
    token logprobs, entropy, KL            fp32 (the fused ops always return fp32)
    KV cache                               the compute dtype
    RM / value scalar head and its scores  fp32 (`head(h.float())` with autocast off)
    ranking loss, rewards, GAE, whitening  fp32
    frozen reference model / RM            same compute dtype and wrapping as the policy

The compute dtype is bf16 when `train.dtype` is "bf16", or "auto" on CUDA; fp32 otherwise
("fp32", or "auto" on CPU). bf16 compute is torch autocast on top of fp32 weights (CPU
autocast on a CPU, so the CPU test suite runs the same code as a GPU run), plus bf16
all-gathers under FSDP2.

PPO runs generation, the experience pass (old logprobs, values, reference logprobs, RM scores)
and the updates inside the same `autocast(...)`, so the first ratio is exactly 1 and the
old values equal the values the update recomputes, in bf16 as in fp32.
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = ("auto", "bf16", "fp32")


def compute_dtype(dtype: str, device) -> torch.dtype:
    """torch.bfloat16 or torch.float32 for a `train.dtype` setting on `device`."""
    if dtype not in DTYPES:
        raise ValueError(f"train.dtype={dtype!r}: expected one of {DTYPES}")
    dev = torch.device(device).type
    if dtype == "bf16" or (dtype == "auto" and dev == "cuda"):
        return torch.bfloat16
    return torch.float32


def autocast(dtype: str, device):
    """The compute context of the policy: bf16 autocast, or nothing for fp32."""
    dev = torch.device(device).type
    if compute_dtype(dtype, dev) == torch.bfloat16:
        return torch.autocast(dev, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def active_dtype(device_type: str, fallback: torch.dtype) -> torch.dtype:
    """The dtype autocast computes matmuls in on `device_type`, or `fallback` when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return fallback


def fsdp_policy(dtype: torch.dtype):
    """FSDP2 MixedPrecisionPolicy for a compute dtype: gather in it, reduce in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
