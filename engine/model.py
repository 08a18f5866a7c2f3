"""GPT-3 in one file: the language model, its static KV cache, sampling, and the scalar-head
reward / value model.

Architecture (Brown et al. 2020, which follows GPT-2): learned token + position embeddings,
pre-LayerNorm blocks `x + attn(ln_1(x))`, `x + mlp(ln_2(x))` with a 4x GELU MLP, a final
LayerNorm, and the output projection tied to the token embedding. Attention layers alternate
between dense causal and locally banded causal (query i sees keys i-window < j <= i), as GPT-3
did after the Sparse Transformer. Residual dropout on each block output and on the embeddings.
Initialisation as GPT-2: N(0, 0.02), residual output projections scaled by 1/sqrt(2*n_layer).

Every attention call goes through `kernels.attention` (Triton on CUDA, SDPA on CPU); every
token logprob through `kernels.linear_logprobs`, which never materialises [N, V] logits.

Batched prompts of different lengths are left-padded; `kv_start[b]` is the number of pad tokens
of row b. Position ids then start at 0 on the first real token, and pad keys are masked.
Packed rows (several documents in one row) pass `segment_ids [B,T]`: a token attends only to
earlier tokens of its own segment and its position id restarts at 0 in each segment, so each
document is computed exactly as it would be alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from .config import GPTConfig
from .precision import active_dtype


class SaveLoad:
    """`model.save(dir)` / `Cls.load(dir)`: config.json + model.safetensors, written atomically."""

    def save(self, path: str) -> None:
        from .checkpoint import save_model
        save_model(self, path)

    @classmethod
    def load(cls, path: str, map_location="cpu", **overrides):
        from .checkpoint import load_model
        return load_model(cls, path, map_location=map_location, **overrides)


class KVCache:
    """Static cache: k, v [n_layer, B, H, max_len, D] allocated once; `length` tokens are filled.

    Prefill appends a block of tokens (`append`, host-side `length`). Decoding then runs in
    fixed-shape mode (`start_decode`): the slot of the next token is a device tensor `pos`,
    each step writes one column with index_copy_ and attends over the whole max_len with a
    visibility mask, so every step has the same shapes and no host sync: a CUDA graph can
    capture it.
    """

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.d_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.pos = None  # [] long on the device once decoding

    def start_decode(self) -> None:
        self.pos = torch.tensor(self.length, dtype=torch.long, device=self.k.device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Decode: write k, v [B,H,1,D] at slot `pos`; return the whole (max_len) k, v."""
        self.k[layer].index_copy_(2, self.pos.view(1), k.to(self.k.dtype))
        self.v[layer].index_copy_(2, self.pos.view(1), v.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def visible(self, kv_start: torch.Tensor, window: int | None) -> torch.Tensor:
        """Decode: [B,1,1,max_len] bool, key j visible to the token at `pos` (causal, band, pads)."""
        j = torch.arange(self.k.shape[3], device=self.k.device)
        m = (j[None, :] >= kv_start[:, None]) & (j[None, :] <= self.pos)
        if window is not None:
            m = m & (j[None, :] > self.pos - window)
        return m[:, None, None, :]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B,H,T,D] at positions [length, length+T); return views of the filled part."""
        t0, t1 = self.length, self.length + k.shape[2]
        if t1 > self.k.shape[3]:
            raise ValueError(f"KVCache overflow: {t1} tokens > max_len {self.k.shape[3]}")
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        inner = cfg.n_head * cfg.d_head
        self.n_head, self.d_head, self.layer = cfg.n_head, cfg.d_head, layer
        self.window = cfg.window if cfg.is_banded(layer) else None
        self.c_attn = nn.Linear(cfg.d_model, 3 * inner, bias=cfg.bias)
        self.c_proj = nn.Linear(inner, cfg.d_model, bias=cfg.bias)

    def forward(self, x, kv_start=None, cache: KVCache | None = None, segment_ids=None, branch_ids=None):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)
        if cache is not None and cache.pos is not None:  # fixed-shape decode step (T == 1)
            k, v = cache.write(self.layer, k, v)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype),
                                               attn_mask=cache.visible(kv_start, self.window))
            return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))
        if cache is not None:  # prefill: (B, H, T, D) -> attend over everything cached so far
            k, v = cache.append(self.layer, k, v)
        y = kernels.attention(q, k, v, causal=True, window=self.window, kv_start=kv_start,
                              segment_ids=segment_ids, branch_ids=branch_ids)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class GELU(nn.Module):
    """kernels.gelu as a module: the C++ op on CPU fp32, F.gelu(approximate="tanh") otherwise."""

    def forward(self, x):
        return kernels.gelu(x)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)
        self.attn = Attention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)
        self.mlp = nn.Sequential()
        self.mlp.c_fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.mlp.gelu = GELU()  # GPT-2's "gelu_new" (tanh approximation)
        self.mlp.c_proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.compiled = None  # set by compile_blocks: cache-free calls run through torch.compile

    def forward(self, x, kv_start=None, cache=None, segment_ids=None, branch_ids=None):
        if self.compiled is not None and cache is None:
            return _compiled_block(self.compiled)(self, x, kv_start, segment_ids, branch_ids)
        return self.body(x, kv_start, cache, segment_ids, branch_ids)

    def body(self, x, kv_start=None, cache=None, segment_ids=None, branch_ids=None):
        # not forward: the compiled function calls this directly, so module hooks (FSDP's
        # unshard, checkpoint wrappers) run once, eagerly, in __call__ around it
        x = x + self.drop(self.attn(self.ln_1(x), kv_start, cache, segment_ids, branch_ids))
        return x + self.drop(self.mlp(self.ln_2(x)))


_COMPILED: dict = {}


def _compiled_block(key: tuple):
    """One torch.compile'd function per set of compile options, shared by every Block: Dynamo
    lifts each block's parameters as graph inputs (inlined nn.Modules), so blocks of one shape
    share the compiled code instead of compiling once per layer."""
    fn = _COMPILED.get(key)
    if fn is None:
        def block_fn(block, x, kv_start, segment_ids, branch_ids):
            return block.body(x, kv_start, None, segment_ids, branch_ids)
        fn = _COMPILED[key] = torch.compile(block_fn, **dict(key))
    return fn


def compile_blocks(model: nn.Module, enabled: bool = True, **options) -> nn.Module:
    """torch.compile every transformer Block of `model` (GPT, RewardModel, wrapped or not) for
    the cache-free forward: training, scoring, evaluation. Decoding with a KV cache stays eager
    (its fixed-shape step has its own `compile_decode`). Parameters, state_dict keys and
    copies of the model are unchanged: a field on each Block routes its calls through a shared
    compiled function. `options` go to torch.compile (e.g. backend="aot_eager" in tests)."""
    if enabled:
        kernels.backend(torch.empty(0))  # load the C++ ops eagerly: their loader does not trace
    key = tuple(sorted(options.items())) if enabled else None
    for m in model.modules():
        if isinstance(m, Block):
            m.compiled = key
    return model


class GPT(SaveLoad, nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        # The submodules' default inits draw random numbers that init_weights() overwrites; undo
        # those draws so that `GPT(cfg)` and `build(GPT, cfg)` (meta device, no draws) give the
        # same weights for the same seed.
        rng = torch.get_rng_state()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)
        if self.wte.weight.device.type != "meta":
            torch.set_rng_state(rng)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 initialisation, in place, on whatever device the parameters are (see `build`)."""
        self.apply(self._init)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections: keep the stream's variance
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def lm_head_weight(self) -> torch.Tensor:  # tied output embedding [V, d]
        return self.wte.weight

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ forward
    def hidden_states(self, idx, *, kv_start=None, cache: KVCache | None = None, segment_ids=None,
                      branch_ids=None):
        """idx [B,T] long -> [B,T,d] after the final LayerNorm. segment_ids [B,T] (packed rows,
        no cache): attention stays inside each segment and positions restart at 0 in each.
        branch_ids [B,T] (with segment_ids): each segment is a shared prefix (branch 0) followed by
        branches 1, 2, ... that see the prefix and themselves only, each positioned as if it
        directly followed the prefix (kernels.attention): K completions of one prompt in one pass."""
        B, T = idx.shape
        if cache is not None and cache.pos is not None:  # fixed-shape decode step: no host ints
            pos = (cache.pos - kv_start).clamp_min(0).view(B, 1)
            x = self.drop(self.wte(idx) + self.wpe(pos))
            for block in self.h:
                x = block(x, kv_start, cache)
            return self.ln_f(x)
        t0 = cache.length if cache is not None else 0
        if t0 + T > self.cfg.block_size:
            raise ValueError(f"sequence of {t0 + T} tokens exceeds block_size {self.cfg.block_size}")
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache")
        pos = torch.arange(t0, t0 + T, device=idx.device).expand(B, T)
        if kv_start is not None:  # left padding: the first real token gets position 0
            pos = (pos - kv_start.view(B, 1)).clamp_min(0)
        if branch_ids is not None and segment_ids is None:
            raise ValueError("branch_ids need segment_ids (packed rows)")
        if segment_ids is not None:
            if segment_ids.shape != (B, T):
                raise ValueError(f"segment_ids must be [B,T]={B, T}, got {tuple(segment_ids.shape)}")
            pos = kernels.segment_positions(segment_ids.to(idx.device),
                                            None if branch_ids is None else branch_ids.to(idx.device))
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x, kv_start, cache, segment_ids, branch_ids)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def forward(self, idx, targets=None, *, kv_start=None, cache=None, temperature=1.0,
                return_entropy=False, segment_ids=None, target_start: int = 0):
        """idx [B,T] -> logits [B,T,V]; with targets [B,T]: their log-probs [B,T] fp32 instead,
        through kernels.linear_logprobs (no [B,T,V] tensor; targets == -100 give 0).
        target_start=s: log-probs of positions s.. only ([B,T-s]; targets may be [B,T] or
        [B,T-s]), so no LM-head work goes to positions nobody reads (a PPO prompt).

        Training code passes targets, so the call goes through a DDP/FSDP wrapper's forward.
        """
        h = self.hidden_states(idx, kv_start=kv_start, cache=cache, segment_ids=segment_ids)
        if targets is None:
            return F.linear(h, self.lm_head_weight)
        B, T, d = h.shape
        if targets.shape == (B, T) and target_start:
            targets = targets[:, target_start:]
        h = h[:, target_start:]
        T = h.shape[1]
        if targets.shape != (B, T):
            raise ValueError(f"targets must be [B,T]={B, T}, got {tuple(targets.shape)}")
        out = kernels.linear_logprobs(h.reshape(B * T, d), self.lm_head_weight, targets.reshape(B * T),
                                      temperature=temperature, return_entropy=return_entropy)
        if return_entropy:
            return out[0].view(B, T), out[1].view(B, T)
        return out.view(B, T)

    def logprobs(self, idx, *, kv_start=None, temperature=1.0, return_entropy=False):
        """Log-probs [B,T-1] of idx[:, 1:] given their prefixes."""
        return self(idx[:, :-1], idx[:, 1:], kv_start=kv_start, temperature=temperature,
                    return_entropy=return_entropy)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 eos_id: int | None = None, *, kv_start=None, pad_id: int = 0,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 return_logprobs: bool = False, compile_decode: bool = False,
                 eos_check_every: int = 8):
        """Sample continuations with a static KV cache.

        idx: [B,T] long (left-padded, with kv_start [B] = pad count per row) or a list of token
        lists of different lengths (left-padded here with pad_id). temperature=0 is greedy.
        Rows that emitted eos_id keep emitting eos_id. Returns ids [B, T+new]; with
        return_logprobs also the logprobs [B, new] of the sampled tokens under the
        temperature-scaled distribution that was actually sampled (top-p is a sampling filter
        and does not change them), and kv_start.

        Decoding runs fixed-shape steps (see KVCache), compiled into a CUDA graph with
        compile_decode=True on CUDA; all rows finished is checked every eos_check_every tokens,
        and the output is trimmed to the step where it happened, as if checked every token.
        """
        idx, kv_start = _left_pad(idx, kv_start, pad_id, self.wte.weight.device)
        if seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(seed)
        B, T = idx.shape
        w = self.wte.weight
        if T + max_new_tokens > self.cfg.block_size:
            raise ValueError(f"sequence of {T + max_new_tokens} tokens exceeds block_size {self.cfg.block_size}")
        # the cache holds k, v in the compute dtype (bf16 under autocast: half the memory)
        cache = KVCache(self.cfg, B, T + max_new_tokens, w.device, active_dtype(w.device.type, w.dtype))
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        out, lps = [idx], []
        logits = F.linear(self.hidden_states(idx, kv_start=kv_start, cache=cache)[:, -1], w).float()
        cache.start_decode()
        step = self._decode_fn(compile_decode)
        for t in range(max_new_tokens):
            tok, lp = _sample(logits, temperature, top_p, generator)
            if eos_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_id), tok)
                lp = torch.where(done, torch.zeros_like(lp), lp)
                done |= tok == eos_id
            out.append(tok[:, None])
            lps.append(lp[:, None])
            # EOS checked on the host every eos_check_every tokens, not every token (a sync)
            if eos_id is not None and (t + 1) % eos_check_every == 0 and bool(done.all()):
                break
            if t + 1 < max_new_tokens:
                logits = step(tok[:, None], kv_start, cache)
                cache.pos += 1
        ids, lp = torch.cat(out, 1), (torch.cat(lps, 1) if lps else idx.new_zeros(B, 0, dtype=torch.float32))
        if eos_id is not None and lps:  # drop the columns after the step where every row was done
            first = torch.where(ids[:, T:] == eos_id, torch.arange(ids.shape[1] - T, device=ids.device), ids.shape[1])
            n = int(first.min(1).values.max()) + 1 if bool(done.all()) else ids.shape[1] - T
            ids, lp = ids[:, :T + n], lp[:, :n]
        if return_logprobs:
            return ids, lp, kv_start
        return ids

    def _decode(self, tok, kv_start, cache) -> torch.Tensor:
        """One fixed-shape decode step: tok [B,1] at slot cache.pos -> next-token logits [B,V] fp32."""
        return F.linear(self.hidden_states(tok, kv_start=kv_start, cache=cache)[:, -1], self.lm_head_weight).float()

    def _decode_fn(self, compile_decode: bool):
        """The decode step, compiled with CUDA graphs (mode="reduce-overhead") when asked on CUDA.
        Caution: not yet measured on a GPU; Inductor runs the step compiled but without a graph
        when it declines to capture (it reports why), which is still correct."""
        if not (compile_decode and self.wte.weight.is_cuda):
            return self._decode
        if getattr(self, "_compiled_decode", None) is None:
            self._compiled_decode = torch.compile(self._decode, mode="reduce-overhead", dynamic=False)
        return self._compiled_decode



def _left_pad(idx, kv_start, pad_id, device):
    if isinstance(idx, torch.Tensor):
        if idx.dim() != 2:
            raise ValueError(f"idx must be [B,T], got shape {tuple(idx.shape)}")
        if kv_start is None:
            kv_start = torch.zeros(idx.shape[0], dtype=torch.long, device=idx.device)
        return idx, kv_start
    rows = [list(r) for r in idx]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate: every prompt needs at least one token")
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], dtype=torch.long, device=device)
    return ids, torch.tensor([T - len(r) for r in rows], dtype=torch.long, device=device)


def _sample(logits, temperature, top_p, generator):
    """logits [B,V] fp32 -> (token [B], logprob [B] under softmax(logits / temperature))."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]
    logp = torch.log_softmax(logits / temperature, -1)
    probs = logp.exp()
    if top_p < 1.0:  # nucleus: keep the smallest prefix of sorted probs with mass >= top_p
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p
        probs = torch.zeros_like(probs).scatter(1, si, sp * keep)
    tok = _draw(probs, generator)
    return tok, logp.gather(1, tok[:, None])[:, 0]


def _draw(probs, generator=None):
    """One index per row of probs [B,V] (>= 0, rows need not sum to 1), by inverse CDF: the
    first index whose cumulative mass exceeds u * total, u ~ U[0,1), one uniform per row. Same
    distribution as torch.multinomial(probs, 1) (up to fp32 rounding of the cumsum), which draws
    and scans per element: 15x slower on CPU at V=512 and most of a decode step's sampling."""
    c = probs.cumsum(-1)
    u = torch.rand(c.shape[0], 1, generator=generator, device=c.device, dtype=c.dtype) * c[:, -1:]
    i = torch.searchsorted(c, u, right=True).clamp_(max=c.shape[1] - 1)
    # u rounded up to the total (or a zero-mass tail): take the most likely token instead of a
    # zero-probability one; no host sync either way
    return torch.where(probs.gather(1, i) > 0, i, probs.argmax(-1, keepdim=True))[:, 0]


class RewardModel(SaveLoad, nn.Module):
    """GPT trunk + scalar head: idx [B,T] -> per-token scores [B,T]. Also the PPO value model.

    The reward of a response is the score at its last token (the EOS, or the last token when
    it was truncated). `bias` of the head is shifted after RM training so that labeler
    demonstrations score 0 on average (InstructGPT section 3.5).

    An RM trained with a reference term (recipes.rm, rm.ref_loglik) scores

        r(x, y) = head(h_last) + loglik_weight * log pi_ref(y | x)

    where pi_ref is the policy it was trained beside (the SFT model PPO starts from) and
    loglik_weight is learnt with the head. Its caller passes log pi_ref(y | x) as `ref_loglik`
    at the positions it reads; otherwise loglik_weight is 0 and frozen.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk = GPT(cfg)
        rng = torch.get_rng_state()
        self.head = nn.Linear(cfg.d_model, 1)
        if self.head.weight.device.type != "meta":
            torch.set_rng_state(rng)  # as in GPT: the default init's draws are overwritten
        self.loglik_weight = nn.Parameter(torch.zeros(1), requires_grad=False)
        self._init_head()
        # checkpoints from before loglik_weight existed load with 0 (no reference term)
        self._register_load_state_dict_pre_hook(_default_loglik_weight, with_module=True)

    @torch.no_grad()
    def _init_head(self) -> None:
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(self.cfg.d_model + 1))
        nn.init.zeros_(self.head.bias)
        self.loglik_weight.zero_()

    def init_weights(self) -> None:
        self.trunk.init_weights()
        self._init_head()

    @property
    def ref_weight(self) -> float:
        """loglik_weight as a float (0: the RM has no reference term)."""
        w = self.loglik_weight.detach()
        if hasattr(w, "full_tensor"):  # FSDP2 shard (a collective: every rank asks together)
            w = w.full_tensor()
        return float(w.float().sum())

    def forward(self, idx, *, kv_start=None, segment_ids=None, ref_loglik=None, branch_ids=None):
        """idx [B,T] -> scores [B,T]; ref_loglik [B,T] (fp32): log pi_ref of the response, placed
        where the score is read (0 elsewhere), adds loglik_weight * ref_loglik. segment_ids /
        branch_ids: packed rows (GPT.hidden_states)."""
        h = self.trunk.hidden_states(idx, kv_start=kv_start, segment_ids=segment_ids, branch_ids=branch_ids)
        # The scalar head runs in fp32 whatever the trunk's compute dtype (precision policy):
        # scores feed the ranking loss, rewards and value targets, where bf16's 8 bits of
        # mantissa would round away the differences between completions.
        with torch.autocast(h.device.type, enabled=False):
            s = self.head(h.float()).squeeze(-1)
            if ref_loglik is not None:
                s = s + self.loglik_weight.float() * ref_loglik.float()
            return s

    def score_at(self, idx, last_idx, *, kv_start=None):
        """Score of each row at position last_idx [B] -> [B]."""
        s = self(idx, kv_start=kv_start)
        return s.gather(1, last_idx.view(-1, 1)).squeeze(1)

    @classmethod
    def from_gpt(cls, gpt: GPT) -> "RewardModel":
        rm = cls(gpt.cfg).to(gpt.wte.weight.device)
        rm.trunk.load_state_dict(gpt.state_dict())
        return rm



class RewardEnsemble(nn.Module):
    """The mean of several reward models, scored like one RewardModel:

        r(x, y) = 1/n sum_i [ head_i(h_i) + w_i log pi_ref(y | x) ]
                = mean_i head_i(h_i) + mean_i(w_i) log pi_ref(y | x)

    Members trained on the same comparisons from different seeds (head init, data order) err
    on different answers; PPO climbs the errors of a single RM (reward over-optimisation), and
    the mean has fewer of them to climb. Costs one forward per member wherever the RM scores.
    Not saved as one model: load it from the member runs (recipes.rm.load_reward_model with
    comma-separated paths)."""

    def __init__(self, members):
        super().__init__()
        if not members:
            raise ValueError("RewardEnsemble needs at least one reward model")
        self.members = nn.ModuleList(members)
        self.cfg = members[0].cfg

    @property
    def ref_weight(self) -> float:
        return sum(m.ref_weight for m in self.members) / len(self.members)

    def forward(self, idx, **kw):
        return torch.stack([m(idx, **kw) for m in self.members]).mean(0)

    score_at = RewardModel.score_at  # reads self(...): the members' mean


def _default_loglik_weight(module, state_dict, prefix, *args):
    state_dict.setdefault(prefix + "loglik_weight", torch.zeros(1))


def build(cls, cfg: GPTConfig, device="cpu", init: bool = True):
    """`cls(cfg)` (GPT or RewardModel) allocated and initialised directly on `device`.

    The modules are created on the meta device (no memory, no init), then allocated on
    `device` and initialised there, so a 1.3B model is ready in seconds on a GPU instead of
    being filled by CPU `normal_` calls and copied. On the CPU the numbers equal `cls(cfg)`'s
    for the same seed (same init calls in the same order). init=False leaves the memory
    uninitialised, for weights that are loaded next.
    """
    with torch.device("meta"):
        model = cls(cfg)
    model.to_empty(device=device)
    if init:
        model.init_weights()
    return model


def read_config(path: str) -> GPTConfig:
    """The GPTConfig of a model folder written by `.save()`."""
    from .checkpoint import read_model_config
    return read_model_config(path)



def _from_hf(cls, path, **kw):
    """Load a Hugging Face GPT-2 folder (see engine/hf.py)."""
    from .hf import from_hf
    return from_hf(cls, path, **kw)


def _to_hf(self, path, **kw):
    """Write a Hugging Face GPT-2 folder (see engine/hf.py)."""
    from .hf import to_hf
    return to_hf(self, path, **kw)


GPT.from_hf, GPT.to_hf = classmethod(_from_hf), _to_hf
