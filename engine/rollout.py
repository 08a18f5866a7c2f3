"""Batched sampling from the policy and the per-token quantities PPO needs.

A rollout holds left-padded prompts followed by sampled responses:
    seq  [B, P+R]   prompt (left-padded to P, kv_start[b] pads) then response tokens
    mask [B, R]     1 on response tokens up to and including the first EOS
Response token t sits at position P+t of seq and is predicted from position P+t-1, so its
logprob and its value (the state before the action) are read at positions P-1 .. P+R-2, and the
reward model reads its score at the last response token P+len-1 (the EOS, or the last token of a
truncated response).

`policy_logprobs` recomputes logprobs with the same full forward pass that training uses, so the
first PPO ratio is exactly 1 with dropout off; the sampler's own logprobs (KV cache) agree with it
to float tolerance and are kept for checks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    seq: torch.Tensor          # [B, P+R] long
    kv_start: torch.Tensor     # [B] pads before each prompt
    prompt_len: int            # P
    mask: torch.Tensor         # [B, R] float
    sample_logprobs: torch.Tensor  # [B, R] from the sampler
    prompts: list
    responses: list            # decoded response texts (without EOS)
    no_eos: torch.Tensor       # [B] bool: truncated at max_new_tokens

    @property
    def last_idx(self) -> torch.Tensor:
        """[B] position in seq of each response's last token."""
        n = self.mask.sum(1).long().clamp_min(1)
        return self.prompt_len + n - 1

    def trim(self) -> "Rollout":
        """The same episodes without the columns that are padding in every row: the left pads
        all prompts share and the response columns after the longest response. Positions and
        attention depend only on kv_start, so every per-token quantity is unchanged (bar float
        rounding of other GEMM shapes). It pays when lengths vary within a minibatch; on the
        miniature world 32 random episodes nearly always span the full width (measured: no gain)."""
        k0 = int(self.kv_start.min()) if len(self.kv_start) else 0
        R = max(1, int(self.mask.sum(1).max())) if self.mask.numel() else self.mask.shape[1]
        if k0 == 0 and R == self.mask.shape[1]:
            return self
        return Rollout(self.seq[:, k0:self.prompt_len + R], self.kv_start - k0, self.prompt_len - k0,
                       self.mask[:, :R], self.sample_logprobs[:, :R], self.prompts, self.responses, self.no_eos)

    def select(self, idx: torch.Tensor) -> "Rollout":
        i = idx.tolist()
        return Rollout(self.seq[idx], self.kv_start[idx], self.prompt_len, self.mask[idx],
                       self.sample_logprobs[idx], [self.prompts[k] for k in i],
                       [self.responses[k] for k in i], self.no_eos[idx])


@torch.no_grad()
def generate_responses(model, tok, prompts, *, max_new_tokens: int, temperature: float = 1.0,
                       top_p: float = 1.0, seed: int = 0, batch_size: int = 256,
                       max_prompt_len: int | None = None, compile_decode: bool = False) -> Rollout:
    """Sample one response per prompt (str or token list) with the KV cache, in chunks.
    compile_decode: capture the fixed-shape decode step as a CUDA graph (CUDA only)."""
    was = model.training
    model.eval()
    ids = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    limit = max_prompt_len or (model.cfg.block_size - max_new_tokens)
    ids = [r[-limit:] for r in ids]  # keep the end of an over-long prompt
    P = max(len(r) for r in ids)
    seqs, lps, starts = [], [], []
    g = torch.Generator(device=model.wte.weight.device).manual_seed(seed)
    for c in range(0, len(ids), batch_size):
        chunk = ids[c:c + batch_size]
        # Pad every chunk to the same P so chunks concatenate.
        padded = [[tok.pad_id] * (P - len(r)) + r for r in chunk]
        x = torch.tensor(padded, dtype=torch.long, device=model.wte.weight.device)
        ks = torch.tensor([P - len(r) for r in chunk], dtype=torch.long, device=x.device)
        out, lp, _ = model.generate(x, max_new_tokens, temperature, top_p, tok.eos_id, kv_start=ks,
                                    pad_id=tok.pad_id, generator=g, return_logprobs=True,
                                    compile_decode=compile_decode)
        R = out.shape[1] - P
        pad = max_new_tokens - R  # chunks that stopped early: pad with EOS so shapes agree
        if pad:
            out = torch.cat([out, out.new_full((out.shape[0], pad), tok.eos_id)], 1)
            lp = torch.cat([lp, lp.new_zeros(lp.shape[0], pad)], 1)
        seqs.append(out)
        lps.append(lp)
        starts.append(ks)
    model.train(was)
    seq, lp, ks = torch.cat(seqs), torch.cat(lps), torch.cat(starts)
    resp = seq[:, P:]
    is_eos = resp == tok.eos_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], resp.shape[1], dtype=torch.long))
    ar = torch.arange(resp.shape[1], device=resp.device)
    mask = (ar[None] <= first[:, None]).float() * (ar[None] < resp.shape[1]).float()
    # Trim trailing columns nobody uses (every row ended earlier).
    R = int(mask.sum(1).max().item()) if mask.numel() else 0
    R = max(R, 1)
    seq, mask, lp = seq[:, :P + R], mask[:, :R], lp[:, :R] * mask[:, :R]
    texts = [tok.decode(r[: int(n)].tolist()) for r, n in zip(resp, mask.sum(1))]
    no_eos = ~is_eos.any(1)
    return Rollout(seq, ks, P, mask, lp, list(prompts), texts, no_eos)


def policy_logprobs(model, roll: Rollout, *, temperature: float = 1.0, return_entropy: bool = False):
    """[B, R] logprobs of the response tokens under `model` (training forward; grads flow)."""
    P = roll.prompt_len
    x, y = roll.seq[:, :-1], roll.seq[:, P:]
    # the LM head only at the response positions: the prompt's log-probs are never read
    out = model(x, targets=y, kv_start=roll.kv_start, temperature=temperature,
                return_entropy=return_entropy, target_start=P - 1)
    if return_entropy:
        return out[0] * roll.mask, out[1] * roll.mask
    return out * roll.mask


def values(value_model, roll: Rollout) -> torch.Tensor:
    """[B, R] value estimates of the states before each response token."""
    P = roll.prompt_len
    v = value_model(roll.seq[:, :-1], kv_start=roll.kv_start)
    return v[:, P - 1:] * roll.mask


@torch.no_grad()
def score_responses(rm, roll: Rollout, ref=None, *, head_only: bool = False) -> torch.Tensor:
    """[B] reward-model score of each response: the head at its last token, plus
    rm.ref_weight * log pi_ref(response | prompt) for an RM fitted with a reference term
    (recipes.rm, rm.ref_loglik), which then needs `ref`, the reference policy (GPT).
    head_only: the head alone (PPO pays the reference term token by token itself)."""
    s = rm(roll.seq, kv_start=roll.kv_start)
    s = s.gather(1, roll.last_idx.view(-1, 1)).squeeze(1)
    w = 0.0 if head_only else getattr(rm, "ref_weight", 0.0)
    if w:
        if ref is None:
            raise ValueError(f"this reward model adds {w:g} x the reference policy's log-likelihood: "
                             "pass ref= (the policy it was fitted with) or head_only=True")
        s = s + w * policy_logprobs(ref, roll).float().sum(1)
    return s
