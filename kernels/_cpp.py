"""C++ (CPU, OpenMP) ops from csrc/, JIT-built on first use, with autograd and fake kernels.

    linear_logprobs(hidden, weight, targets, *, temperature=1.0, return_entropy=False)
    linear_kl(hidden, weight, ref_hidden, ref_weight, targets, *, temperature=1.0)
    gae(rewards, values, mask, *, gamma, lam)
    gelu_tanh(x)
    gae_cuda(rewards, values, mask, *, gamma, lam)   # CUDA tensors; csrc/gae_cuda.cu
    available() -> bool

Exact semantics are those of linear_logprobs_ref (kernels/logprob.py), linear_kl_ref
(kernels/kl.py), gae_ref (kernels/gae.py) and gelu_ref (kernels/gelu.py); the formulas are
repeated at the top of each csrc/*.cpp file. The C++ kernels are registered as torch ops
`engine_ops::linear_logprobs_fwd`, `linear_logprobs_bwd`, `linear_kl_fwd`, `linear_kl_bwd`, `gae`,
`gelu_tanh_fwd` and `gelu_tanh_bwd` (schemas in csrc/ops.cpp).
This module adds fake (meta) kernels so torch.compile can trace them, and autograd formulas
(torch.library.register_autograd) that call the *_bwd ops.

Build: torch.utils.cpp_extension.load (ninja) with -O3 -fopenmp into
$ENGINE_CSRC_CACHE/csrc-<hash> (default root ~/.cache/instructgpt-engine), where the hash
covers the sources, the flags, the torch and Python versions, so edits or upgrades rebuild and
old builds are never reused. A first build takes about a minute; later processes only dlopen.
ENGINE_NO_CSRC=1 disables the ops. Any failure (no compiler, no ninja, compile error) gives
one warning and available() == False; importing this module never builds or raises.

Caution:
  * fp32 compute. bf16/fp16 hidden/weight are converted to fp32 copies in the wrapper (the
    gradient flows back through the conversion); the outputs are fp32.
  * No -march=native and no -ffast-math: the cached .so must run on any x86-64 machine that
    shares the cache, and reductions must not be reassociated behind our back. Vector width
    comes from per-function target clones (AVX-512 / AVX2 / baseline) chosen at load time, so
    results are bit-identical across reruns on one machine but may differ in the last bits
    between machines with different vector units.
  * The GEMMs go through ATen (MKL/oneDNN on x86); their threading is ATen's. Reruns are
    bit-identical at a fixed thread count (tests check this); changing torch.set_num_threads
    between runs may change the last bits.
  * Targets are validated in Python in eager mode (like the Triton path); under torch.compile
    that data-dependent check is skipped and the C++ TORCH_CHECK rejects bad targets instead.
"""
import functools
import hashlib
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["available", "linear_logprobs", "linear_kl", "gae", "gelu_tanh", "gae_cuda", "build_info"]

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_CFLAGS = ["-O3", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_lock = threading.Lock()
_state = {"ok": None, "cuda_ok": None, "warned": False, "build_dir": None, "build_s": None}


def _digest(files, flags):
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    return h.hexdigest()[:16]


def _cache_root():
    root = os.environ.get("ENGINE_CSRC_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "instructgpt-engine"


def _warn(msg):
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"engine C++ ops unavailable, using the PyTorch paths: {msg}", RuntimeWarning,
                      stacklevel=3)


def _build(sources, tag, extra_cflags=(), cuda=False):
    """cpp_extension.load into the hashed cache dir; returns the build dir."""
    from torch.utils import cpp_extension
    flags = _CFLAGS + list(extra_cflags)
    digest = _digest(sorted(_CSRC.glob("*.h")) + list(sources), flags + [tag])
    build_dir = _cache_root() / f"{tag}-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    kw = dict(extra_cuda_cflags=["-O3"]) if cuda else {}
    cpp_extension.load(name=f"engine_{tag.replace('-', '_')}_{digest}",
                       sources=[str(s) for s in sources], extra_cflags=flags,
                       extra_ldflags=_LDFLAGS, extra_include_paths=[str(_CSRC)],
                       build_directory=str(build_dir), is_python_module=False, verbose=False,
                       **kw)
    return build_dir


def available():
    """True when the CPU ops are built and loaded (builds them on the first call)."""
    if _state["ok"] is not None:
        return _state["ok"]
    with _lock:
        if _state["ok"] is not None:
            return _state["ok"]
        ok = False
        if os.environ.get("ENGINE_NO_CSRC", "0") == "1":
            pass  # disabled on purpose: no warning
        elif shutil.which(os.environ.get("CXX", "c++")) is None:
            _warn("no C++ compiler found (set CXX)")
        else:
            from torch.utils import cpp_extension
            if not cpp_extension.is_ninja_available():
                _warn("ninja is not installed")
            else:
                import time
                t0 = time.perf_counter()
                try:
                    srcs = sorted(_CSRC.glob("*.cpp"))
                    _state["build_dir"] = _build(srcs, "csrc")
                    _register_python_side()
                    ok = True
                except Exception as e:  # compile/link/load errors must not break the engine
                    _warn(f"{type(e).__name__}: {str(e)[-2000:]}")
                _state["build_s"] = time.perf_counter() - t0
        _state["ok"] = ok
        return ok


def build_info():
    """{'ok', 'build_dir', 'build_s'} of the CPU build (build_s = load time incl. any compile)."""
    available()
    return {k: _state[k] for k in ("ok", "build_dir", "build_s")}


def _require():
    if not available():
        raise RuntimeError("engine C++ ops are unavailable (ENGINE_NO_CSRC=1, no compiler, or the "
                           "build failed; see the earlier warning)")


# ----------------------------------------------------------------------------- fake kernels
# and autograd; registered once, right after the library is loaded.

def _register_python_side():
    lib = "engine_ops::"

    @torch.library.register_fake(lib + "linear_logprobs_fwd")
    def _(hidden, weight, targets, temperature):
        n = hidden.shape[0]
        return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(3))

    @torch.library.register_fake(lib + "linear_logprobs_bwd")
    def _(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, temperature):
        return torch.empty_like(hidden), torch.empty_like(weight)

    @torch.library.register_fake(lib + "linear_kl_fwd")
    def _(hidden, weight, ref_hidden, ref_weight, targets, temperature):
        n = hidden.shape[0]
        return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(5))

    @torch.library.register_fake(lib + "linear_kl_bwd")
    def _(grad_logp, grad_kl, hidden, weight, ref_hidden, ref_weight, targets, lse, eu, temperature):
        return torch.empty_like(hidden), torch.empty_like(weight)

    @torch.library.register_fake(lib + "gelu_tanh_fwd")
    def _(x):
        return torch.empty_like(x)

    @torch.library.register_fake(lib + "gelu_tanh_bwd")
    def _(grad, x):
        return torch.empty_like(x)

    def gelu_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def gelu_backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.ops.engine_ops.gelu_tanh_bwd(g.contiguous(), x)

    torch.library.register_autograd(lib + "gelu_tanh_fwd", gelu_backward, setup_context=gelu_setup)

    @torch.library.register_fake(lib + "gae")
    def _(rewards, values, mask, gamma, lam):
        return (rewards.new_empty(rewards.shape, dtype=torch.float32),
                rewards.new_empty(rewards.shape, dtype=torch.float32))

    def lp_setup(ctx, inputs, output):
        hidden, weight, targets, temperature = inputs
        _, ent, lse = output
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)

    def lp_backward(ctx, g_logp, g_ent, _g_lse):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        if g_logp is None and g_ent is None:
            return None, None, None, None
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp
        g_ent = lse.new_empty(0) if g_ent is None else g_ent
        dh, dw = torch.ops.engine_ops.linear_logprobs_bwd(g_logp, g_ent, hidden, weight, targets,
                                                          lse, ent, ctx.temperature)
        return (dh if ctx.needs_input_grad[0] else None,
                dw if ctx.needs_input_grad[1] else None, None, None)

    torch.library.register_autograd(lib + "linear_logprobs_fwd", lp_backward,
                                    setup_context=lp_setup)

    def kl_setup(ctx, inputs, output):
        hidden, weight, ref_hidden, ref_weight, targets, temperature = inputs
        _, ref_logp, _, lse, eu = output
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, targets, lse, eu)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(ref_logp, lse, eu)
        ctx.set_materialize_grads(False)

    def kl_backward(ctx, g_logp, _g_ref, g_kl, _g_lse, _g_eu):
        hidden, weight, ref_hidden, ref_weight, targets, lse, eu = ctx.saved_tensors
        if g_logp is None and g_kl is None:
            return (None,) * 6
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp
        g_kl = lse.new_empty(0) if g_kl is None else g_kl
        dh, dw = torch.ops.engine_ops.linear_kl_bwd(g_logp, g_kl, hidden, weight, ref_hidden,
                                                    ref_weight, targets, lse, eu, ctx.temperature)
        # the reference side is a constant: never a gradient for ref_hidden / ref_weight
        return (dh if ctx.needs_input_grad[0] else None,
                dw if ctx.needs_input_grad[1] else None, None, None, None, None)

    torch.library.register_autograd(lib + "linear_kl_fwd", kl_backward, setup_context=kl_setup)


# ----------------------------------------------------------------------------- public wrappers

def _f32(t):
    # the C++ kernels are fp32-only; .float() is a no-op for fp32 and differentiable otherwise
    return t if t.dtype == torch.float32 else t.float()


def _checked(check, *args):
    """Full validation in eager mode. Under torch.compile the target-range check (a host sync on
    data) would break the graph, so only targets.long() is kept; shapes are still checked by
    the fake kernels and the C++ TORCH_CHECKs (which also reject out-of-range targets)."""
    if torch.compiler.is_compiling():
        return args[-2].long()
    return check(*args)


def linear_logprobs(hidden, weight, targets, *, temperature=1.0, return_entropy=False):
    """C++ version of kernels.linear_logprobs_ref: logp [N] fp32 (and entropy [N])."""
    from .logprob import check_inputs
    targets = _checked(check_inputs, hidden, weight, targets, temperature)
    if hidden.is_cuda:
        raise ValueError("engine C++ linear_logprobs runs on CPU tensors only")
    _require()
    logp, ent, _ = torch.ops.engine_ops.linear_logprobs_fwd(_f32(hidden), _f32(weight), targets,
                                                            float(temperature))
    return (logp, ent) if return_entropy else logp


def linear_kl(hidden, weight, ref_hidden, ref_weight, targets, *, temperature=1.0):
    """C++ version of kernels.linear_kl_ref -> (logp, ref_logp, kl), each [N] fp32."""
    from .kl import _check_kl_inputs
    targets = _checked(_check_kl_inputs, hidden, weight, ref_hidden, ref_weight, targets,
                       temperature)
    if hidden.is_cuda:
        raise ValueError("engine C++ linear_kl runs on CPU tensors only")
    _require()
    logp, ref_logp, kl, _, _ = torch.ops.engine_ops.linear_kl_fwd(
        _f32(hidden), _f32(weight), _f32(ref_hidden.detach()), _f32(ref_weight.detach()),
        targets, float(temperature))
    return logp, ref_logp, kl


def gelu_tanh(x):
    """C++ version of kernels.gelu_ref (tanh approximation): same shape; fp32 compute and output."""
    if x.is_cuda:
        raise ValueError("engine C++ gelu_tanh runs on CPU tensors only")
    _require()
    return torch.ops.engine_ops.gelu_tanh_fwd(_f32(x))


def gae(rewards, values, mask, *, gamma, lam):
    """C++ version of kernels.gae_ref -> (advantages, returns) [B, T] fp32 (CPU tensors)."""
    from .gae import _check
    _check(rewards, values, mask, gamma, lam)
    if rewards.is_cuda:
        return gae_cuda(rewards, values, mask, gamma=gamma, lam=lam)
    _require()
    return torch.ops.engine_ops.gae(rewards.detach(), values.detach(), mask.detach(),
                                    float(gamma), float(lam))


@functools.lru_cache(maxsize=None)
def _load_cuda():
    _require()
    _build([_CSRC / "gae_cuda.cu"], "csrc-cuda", cuda=True)
    return True


def gae_cuda(rewards, values, mask, *, gamma, lam):
    """GAE with the CUDA kernel of csrc/gae_cuda.cu (one thread per sequence); CUDA tensors."""
    from .gae import _check
    _check(rewards, values, mask, gamma, lam)
    if not rewards.is_cuda:
        raise ValueError("gae_cuda takes CUDA tensors")
    _load_cuda()
    return torch.ops.engine_ops.gae(rewards.detach(), values.detach(), mask.detach(),
                                    float(gamma), float(lam))
