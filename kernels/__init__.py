"""Custom ops of the engine, with one dispatch point per op.

    attention(q, k, v, *, causal=True, window=None, scale=None, kv_start=None, segment_ids=None)
    attention_backend(q, k, v, ...) -> "triton" | "sdpa" | "torch" | "ref" for such a call
    linear_logprobs(hidden, weight, targets, *, temperature=1.0, return_entropy=False)
    linear_kl(hidden, weight, ref_hidden, ref_weight, targets, *, temperature=1.0)
    gae(rewards, values, mask, *, gamma, lam)
    gelu(x)                      # tanh-approximate GELU (C++ op on CPU fp32)

Backend choice (ENGINE_KERNELS=auto|ref|triton|cpp|torch, default auto):
  auto   CUDA tensors -> Triton; CPU tensors -> C++ op from csrc/ when it builds,
         else the chunked PyTorch path (which still never materializes [N, V] logits).
  ref    the plain PyTorch references `*_ref` (test oracles, A/B checks).
  triton force Triton (on CPU tensors this needs TRITON_INTERPRET=1; that is how CI tests it).
  cpp    force the C++ ops (CPU tensors).
  torch  force the chunked / SDPA PyTorch paths.
Attention has no C++ op: on CPU, `auto` and `cpp` use the SDPA path. On CUDA, `auto` sends dense
causal / non-causal 16-bit calls (no window, left padding or segments) to whichever of our Triton
kernel and SDPA's flash / cuDNN backend timed faster for that shape on first use (logged by the
"kernels.attention" logger); `triton` always uses ours.
"""
import importlib
import os

import torch

from .attention import attention_ref
from .gae import gae_ref
from .gelu import gelu_ref, gelu_torch
from .kl import linear_kl_ref
from .logprob import linear_logprobs_ref

__all__ = ["attention", "attention_backend", "segment_positions", "linear_logprobs", "linear_kl",
           "gae", "gelu", "backend",
           "attention_ref", "linear_logprobs_ref", "linear_kl_ref", "gae_ref", "gelu_ref"]

_VALID = ("auto", "ref", "triton", "cpp", "torch")


def backend(t, has_cpp=True):
    """The backend name used for tensor `t` under the current ENGINE_KERNELS setting."""
    mode = os.environ.get("ENGINE_KERNELS", "auto").lower()
    if mode not in _VALID:
        raise ValueError(f"ENGINE_KERNELS={mode!r}: expected one of {_VALID}")
    if mode != "auto":
        return mode
    if t.is_cuda:
        return "triton"
    if has_cpp and _cpp_available():
        return "cpp"
    return "torch"


_MODS: dict = {}


def _mod(name):
    # importlib, not `from . import gae`: the package attribute `gae` is the function below.
    # Cached in a dict: under torch.compile a dict lookup traces, importlib graph-breaks.
    m = _MODS.get(name)
    if m is None:
        m = _MODS[name] = importlib.import_module(f"{__name__}.{name}")
    return m


def _cpp_available() -> bool:
    try:
        from . import _cpp
    except ImportError:
        return False
    return _cpp.available()


def attention_backend(q, k, v, *, causal=True, window=None, scale=None, kv_start=None,
                      segment_ids=None):
    """Name of the implementation `attention` uses for these arguments: "ref", "triton",
    "sdpa" (CUDA: torch SDPA's flash / cuDNN kernels, chosen under ENGINE_KERNELS=auto for dense
    calls where they time faster on first use; see kernels/attention.py) or "torch" (the SDPA
    path with an explicit mask, CPU)."""
    b = backend(q, has_cpp=False)
    if b == "cpp":
        b = "torch"
    if b == "triton" and q.is_cuda and os.environ.get("ENGINE_KERNELS", "auto").lower() == "auto":
        from .attention import choose_backend
        b = choose_backend(q, k, v, causal=causal, window=window, scale=scale, kv_start=kv_start,
                           segment_ids=segment_ids)
    return b


def attention(q, k, v, *, causal=True, window=None, scale=None, kv_start=None, segment_ids=None,
              branch_ids=None):
    """Scaled dot-product attention. q [B,H,Tq,D], k/v [B,H,Tk,D] with Tq <= Tk.

    Query i sits at absolute position p_i = Tk - Tq + i (bottom-right aligned, so prefill and
    one-token decode against a KV cache use the same call). Key j is visible to query i iff
    j <= p_i (causal), j > p_i - window (window=w), j >= kv_start[b] (left padding), and j lies
    in the same segment as p_i (segment_ids [B,Tk] int: packed rows; a segment is a maximal run
    of equal ids). Rows that see no key return 0. ENGINE_KERNELS=triton forces the Triton kernels.
    branch_ids [B,Tk] (with segment_ids): a tree per segment, see kernels/attention.py; such calls
    always take the explicit-mask SDPA path ("torch"), or the reference under ENGINE_KERNELS=ref.
    """
    if isinstance(q, torch.Tensor) and torch.is_autocast_enabled(q.device.type) and q.dtype == torch.float32:
        # follow autocast like the fused LM head: 16-bit tiles (tensor cores on CUDA)
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    b = attention_backend(q, k, v, causal=causal, window=window, scale=scale, kv_start=kv_start,
                          segment_ids=segment_ids)
    kw = dict(causal=causal, window=window, scale=scale, kv_start=kv_start, segment_ids=segment_ids)
    if branch_ids is not None:  # the Triton / flash kernels have no tree mask
        kw["branch_ids"] = branch_ids
        b = "ref" if b == "ref" else "torch"
    if b == "ref":
        fn = attention_ref
    else:
        mod = _mod("attention")
        fn = {"triton": mod.attention_triton, "sdpa": mod.attention_sdpa}.get(b, mod.attention_torch)
    with _no_autocast(q):  # the impls choose their own internal precision
        return fn(q, k, v, **kw)


def segment_positions(segment_ids, branch_ids=None):
    """Position of each token inside its segment of a packed row (restarts at 0); a branch
    (branch_ids) continues from the end of its segment's prefix."""
    return _mod("attention").segment_positions(segment_ids, branch_ids)


# op -> {backend: (module, function)}; "cpp" functions live in kernels/_cpp.py.
_IMPLS = {
    "linear_logprobs": {"ref": ("logprob", "linear_logprobs_ref"), "triton": ("logprob", "linear_logprobs_triton"),
                        "torch": ("logprob", "linear_logprobs_chunked"), "cpp": ("_cpp", "linear_logprobs")},
    "linear_kl": {"ref": ("kl", "linear_kl_ref"), "triton": ("kl", "linear_kl_triton"),
                  "torch": ("kl", "linear_kl_chunked"), "cpp": ("_cpp", "linear_kl")},
    "gae": {"ref": ("gae", "gae_ref"), "triton": ("gae", "gae_triton"), "torch": ("gae", "gae_torch"),
            "cpp": ("_cpp", "gae")},
}


def _impl(op: str, t):
    mod, fn = _IMPLS[op][backend(t)]
    return getattr(_mod(mod), fn)


def _compute_pair(hidden, weight):
    """The (hidden, weight) pair in the dtype the fused LM head computes in (engine/precision.py).

    Under autocast: the autocast dtype (tensor-core tiles on CUDA, even when LayerNorm handed
    over fp32 activations and the weight is an fp32 master copy). Without autocast, a pair of
    different float dtypes (FSDP2 gathers bf16 weights while a LayerNorm returns fp32) computes
    in the weight's dtype. The casts are differentiable, so gradients reach the original dtypes.
    """
    if not (isinstance(hidden, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return hidden, weight  # the op's own checks name the bad argument
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        return hidden, weight
    dt = weight.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        dt = torch.get_autocast_dtype(hidden.device.type)
    return hidden.to(dt), weight.to(dt)


def _no_autocast(t):
    # The impls pick their own precision (fp32 accumulation, fp32 softmax); autocast inside
    # them would re-cast their fp32 GEMMs to bf16.
    dev = t.device.type if isinstance(t, torch.Tensor) else "cpu"
    return torch.autocast(dev, enabled=False)


def linear_logprobs(hidden, weight, targets, *, temperature=1.0, return_entropy=False):
    """log_softmax(hidden @ weight.T / temperature).gather(targets) without the [N, V] logits.

    hidden [N,d], weight [V,d], targets [N] long (-100 = ignored: 0 out, no gradient)
    -> logp [N] fp32 (and entropy [N] fp32 if return_entropy).
    Follows autocast: under it the products are computed in the autocast dtype (see
    `_compute_pair`); the softmax and the outputs stay fp32.
    """
    hidden, weight = _compute_pair(hidden, weight)
    with _no_autocast(hidden):
        return _impl("linear_logprobs", hidden)(hidden, weight, targets, temperature=temperature,
                                                return_entropy=return_entropy)


def linear_kl(hidden, weight, ref_hidden, ref_weight, targets, *, temperature=1.0):
    """Target logprob under policy and reference and the exact per-token KL(pi || pi_ref).

    -> (logp [N], ref_logp [N], kl [N]) fp32; gradients flow to hidden and weight only.
    Follows autocast like `linear_logprobs` (policy and reference in the same compute dtype).
    """
    hidden, weight = _compute_pair(hidden, weight)
    ref_hidden, ref_weight = _compute_pair(ref_hidden, ref_weight)
    if isinstance(ref_hidden, torch.Tensor) and isinstance(hidden, torch.Tensor) \
            and ref_hidden.is_floating_point() and ref_hidden.dtype != hidden.dtype:
        ref_hidden, ref_weight = ref_hidden.to(hidden.dtype), ref_weight.to(hidden.dtype)
    with _no_autocast(hidden):
        return _impl("linear_kl", hidden)(hidden, weight, ref_hidden, ref_weight, targets,
                                          temperature=temperature)


def gae(rewards, values, mask, *, gamma, lam):
    """Masked GAE. rewards/values/mask [B,T] -> (advantages, returns) [B,T] fp32.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t ;  A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    on positions with m_t = 1; padding (m_t = 0) gives 0 and the scan never crosses it.
    returns = advantages + values (0 on padding).
    """
    return _impl("gae", rewards)(rewards, values, mask, gamma=gamma, lam=lam)


def gelu(x):
    """GPT-2's tanh GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), same shape and dtype.
    CPU fp32 under auto/cpp: the C++ op of csrc/gelu.cpp; ref: gelu_ref; otherwise (CUDA, 16-bit,
    torch, triton) F.gelu(approximate="tanh")."""
    b = backend(x)
    if b == "ref":
        return gelu_ref(x)
    if b == "cpp" and not x.is_cuda and x.dtype == torch.float32:
        return _mod("_cpp").gelu_tanh(x)
    return gelu_torch(x)
