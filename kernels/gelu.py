"""GPT-2's tanh-approximate GELU ("gelu_new"), the MLP activation of the model.

    gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            = x sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))           (the same function)

Implementations: `gelu_ref` (the formula in fp64-capable torch ops: the test oracle), `gelu_torch`
(F.gelu(approximate="tanh")), and the C++ CPU op in csrc/gelu.cpp (kernels/_cpp.py: gelu_tanh),
which evaluates the sigmoid form with one vectorised exp. Why a CPU op: ATen's CPU tanh GELU is
~3x slower than its erf GELU, and on the miniature model it was ~12% of a training step. There is
no Triton kernel: on CUDA the op is memory-bound and torch's elementwise kernel (or torch.compile's
fusion) already runs at bandwidth.
Caution: the C++ op computes in fp32 (~1e-6 relative error against fp64); 16-bit inputs (under
autocast) take the torch path and keep their dtype.
"""
import math

import torch
import torch.nn.functional as F

_C = math.sqrt(2.0 / math.pi)


def gelu_ref(x: torch.Tensor) -> torch.Tensor:
    """The formula, written out (no fused kernel); differentiable; any dtype."""
    return 0.5 * x * (1.0 + torch.tanh(_C * (x + 0.044715 * x * x * x)))


def gelu_torch(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")
