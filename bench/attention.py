"""Attention fwd and fwd+bwd: causal, banded (query i sees keys i-w < j <= i) and packed
(causal inside documents of a packed row: segment ids, DOC_LEN tokens per document).

Providers (same q, k, v; [B, H, T, D]):
  ours            GPU: kernels.attention_triton; CPU: kernels.attention_torch (SDPA + mask)
  ours_auto       GPU: kernels.attention (ENGINE_KERNELS=auto: per shape the faster of ours and
                  SDPA flash / cuDNN for dense causal; ours otherwise)
  flex            torch FlexAttention (torch.compile'd), banded / packed block masks
  sdpa_flash      F.scaled_dot_product_attention under sdpa_kernel(FLASH_ATTENTION), causal only
                  (the flash backend takes no mask, so banded is not supported)
  sdpa_efficient  same under EFFICIENT_ATTENTION (banded: explicit bool mask)
  sdpa_cudnn      same under CUDNN_ATTENTION (causal only)
  flash_attn      flash_attn.flash_attn_func when the package is installed (window_size=(w-1, 0))
  eager           kernels.attention_ref (dense masked softmax, fp32 math); GPU: T <= 4096 only
Shapes (GPU, FlashAttention benchmark convention): B*T = 16384 tokens, H*D = 2048, bf16,
T = 512..16384, D = 64 / 128, window 256. CPU --quick: tiny sizes, fp32.
FLOPs (written here, flash-attention benchmarks/benchmark_flash_attention.py convention):
  fwd = 4 * B * H * D * pairs, pairs = T*T (dense), T*T/2 (causal),
        sum_i min(i+1, w) = w(w+1)/2 + (T-w)*w (banded, the pairs actually visible);
  fwd+bwd = 3.5 * fwd (bwd counted as 2.5 * fwd).
  packed: pairs = sum over documents L (L + 1) / 2.
Baseline: GPU causal sdpa_flash, GPU banded flash_attn if installed else sdpa_efficient, GPU
packed flex; CPU eager. Targets (issue 11): ours fwd+bwd >= sdpa_flash (causal), >= 1.5x flex
(banded).
"""

import torch
import torch.nn.functional as F

from kernels.attention import attention_mask, attention_ref, attention_torch

from .common import plot_sweep

DESCRIPTION = "attention fwd / fwd+bwd"
EAGER_MAX_T_GPU = 4096
DOC_LEN = 512          # packed rows: documents of this many tokens (the last one may be shorter)


def segment_ids(B, T, device):
    return (torch.arange(T, device=device) // DOC_LEN).expand(B, T).contiguous()


def pairs(T, mask, w):
    if mask == "causal":
        return T * T / 2
    if mask == "banded":
        w = min(w, T)
        return w * (w + 1) / 2 + (T - w) * w
    if mask == "packed":
        full, rest = divmod(T, DOC_LEN)
        return full * DOC_LEN * (DOC_LEN + 1) / 2 + rest * (rest + 1) / 2
    return T * T


def flops(B, H, T, D, mask, w, mode):
    f = 4 * B * H * D * pairs(T, mask, w)
    return f * (3.5 if mode == "fwd_bwd" else 1.0)


def configs(run):
    """[(mode, mask, D, T, B, H, window, dtype)]"""
    out = []
    if run.device == "cuda":
        # most important first (a timeout keeps what finished): fwd+bwd causal d128
        for mode in ("fwd_bwd", "fwd"):
            for mask in ("causal", "banded", "packed"):
                for D in (128, 64):
                    for T in (512, 1024, 2048, 4096, 8192, 16384):
                        out.append((mode, mask, D, T, 16384 // T, 2048 // D, 256, torch.bfloat16))
        return out
    if run.tiny:
        return [("fwd", "causal", 16, 64, 1, 2, 16, torch.float32)]
    Ts = (128, 256, 512) if run.quick else (256, 512, 1024, 2048)
    for mode in ("fwd", "fwd_bwd"):
        for mask in ("causal", "banded"):
            for T in Ts:
                out.append((mode, mask, 64, T, 1, 4, 64, torch.float32))
    return out


def _sdpa(backend_name, mask_kind, w, T, device):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)
    attn_mask = None
    if mask_kind == "banded":
        if backend_name != "EFFICIENT_ATTENTION":
            return None
        attn_mask = attention_mask(T, T, causal=True, window=w, device=device)

    def f(q, k, v):
        with sdpa_kernel(backend):
            if attn_mask is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return f


def _flash_attn(mask_kind, w):
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001 - optional dependency
        return None
    win = (w - 1, 0) if mask_kind == "banded" else (-1, -1)

    def f(q, k, v):  # q, k, v already [B, T, H, D] (transposed outside the timed region)
        return flash_attn_func(q, k, v, causal=True, window_size=win)
    f.layout = "bthd"
    return f


def _flex(mask_kind, w, B, T, device):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception:  # noqa: BLE001 - torch without FlexAttention
        return None
    seg = segment_ids(B, T, device)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = kv_idx <= q_idx
        if mask_kind == "banded":
            ok = ok & (kv_idx > q_idx - w)
        if mask_kind == "packed":
            ok = ok & (seg[b, q_idx] == seg[b, kv_idx])
        return ok

    block = create_block_mask(mask_mod, B if mask_kind == "packed" else None, None, T, T,
                              device=device)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block)


def providers(run, mask_kind, w, T, B=1):
    """name -> (fn(q, k, v) or None, why-not)."""
    win = w if mask_kind == "banded" else None
    seg = segment_ids(B, T, run.device) if mask_kind == "packed" else None
    kw = dict(causal=True, window=win, segment_ids=seg)
    p = {}
    if run.device == "cuda":
        import kernels
        from kernels.attention import attention_triton
        p["ours"] = (lambda q, k, v: attention_triton(q, k, v, **kw), "")
        p["ours_auto"] = (lambda q, k, v: kernels.attention(q, k, v, **kw), "")
        for name, be in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_efficient", "EFFICIENT_ATTENTION"),
                         ("sdpa_cudnn", "CUDNN_ATTENTION")):
            f = _sdpa(be, mask_kind, w, T, "cuda") if mask_kind != "packed" else None
            p[name] = (f, "" if f else "backend takes no mask")
        fa = _flash_attn(mask_kind, w) if mask_kind != "packed" else None
        p["flash_attn"] = (fa, "" if fa else "flash_attn not installed or no segment mask")
        fl = _flex(mask_kind, w, B, T, "cuda") if mask_kind != "causal" else None
        p["flex"] = (fl, "" if fl else "no FlexAttention (or dense causal)")
        ok = T <= EAGER_MAX_T_GPU
        p["eager"] = ((lambda q, k, v: attention_ref(q, k, v, **kw)) if ok else None,
                      "" if ok else f"T > {EAGER_MAX_T_GPU} (dense fp32 scores)")
    else:
        p["ours"] = (lambda q, k, v: attention_torch(q, k, v, **kw), "")
        p["eager"] = (lambda q, k, v: attention_ref(q, k, v, **kw), "")
    return {k: v for k, v in p.items() if run.want(k)}


def baseline(run, mask_kind, provs):
    if run.device != "cuda":
        return "eager"
    if mask_kind == "causal":
        return "sdpa_flash"
    if mask_kind == "packed":
        return "flex"
    return "flash_attn" if provs.get("flash_attn", (None,))[0] else "sdpa_efficient"


def run(run):
    dev = run.device
    for mode, mask_kind, D, T, B, H, w, dtype in configs(run):
        case = {"mode": mode, "mask": mask_kind, "T": T, "D": D, "B": B, "H": H,
                "window": w if mask_kind == "banded" else "", "dtype": str(dtype).split(".")[-1]}
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, generator=g).to(dev, dtype) for _ in range(3))
        do = torch.randn(B, H, T, D, generator=g).to(dev, dtype)
        work = flops(B, H, T, D, mask_kind, w, mode)
        provs = providers(run, mask_kind, w, T, B)
        rows = []
        for name, (fn, why) in provs.items():
            if fn is None:
                rows.append(run.skip(case, name, why))
                continue
            if getattr(fn, "layout", "") == "bthd":
                args = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
                grad_out = do.transpose(1, 2).contiguous()
            else:
                args, grad_out = [q, k, v], do
            if mode == "fwd_bwd":
                args = [t.detach().requires_grad_(True) for t in args]

                def call(fn=fn, args=args, grad_out=grad_out):
                    for t in args:
                        t.grad = None
                    fn(*args).backward(grad_out)
            else:
                def call(fn=fn, args=args):
                    with torch.no_grad():
                        fn(*args)
            rows.append(run.measure(case, name, call, work=work, work_unit="flop",
                                    rate_unit="TFLOP/s" if dev == "cuda" else "GFLOP/s"))
        run.finish_case(rows, baseline(run, mask_kind, provs))
        del q, k, v, do
    run.summary(["mode", "mask", "T", "D"], "baseline")
    if run.plot:
        plot_sweep(run, x="T", series=[], facets=["mode", "mask", "D"],
                   ylabel="TFLOP/s" if dev == "cuda" else "GFLOP/s")
