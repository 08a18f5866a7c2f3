"""Reward model on K ranked completions per prompt (InstructGPT stage 2).

    python -m recipes.rm --model.init=runs/sft                   # bundled OpenAssistant rankings
    python -m recipes.rm --data.path=ranked.jsonl,pairs.jsonl.gz --rm.demos=demos.jsonl
    torchrun --nproc_per_node 8 -m recipes.rm --config recipes/configs/rm_gpt3_1.3b.toml

The model is the SFT trunk with the LM head replaced by a scalar head. All C(K,2) pairs of one
prompt form one batch element (one forward per completion, loss averaged over its pairs), a
batch is train.batch_size prompts, and the paper trains exactly one epoch (train.max_steps=0
means one epoch) at lr 9e-6 with cosine decay to 10%. Afterwards the head's bias is shifted so
that the demonstrations (rm.demos) score 0 on average.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine import dist
from engine.checkpoint import CheckpointError
from engine.config import DataSection, DistSection, ModelSection, TrainConfig, section
from engine.data import collate_rankings, encode_rankings, encode_sft, load_rankings, load_sft, unflatten_groups
from engine.losses import ranking_accuracy, ranking_loss
from engine.model import RewardEnsemble, RewardModel
from engine.trainer import Trainer
from recipes import common


@dataclass
class RMSection:
    epochs: float = 1.0          # used when train.max_steps = 0 (paper: one epoch; more overfits)
    demos: str = ""              # SFT-format demonstrations: shift the bias so they score 0 on average
    ref_loglik: bool = False     # score = head + w * log pi_ref(y | x), w learnt with the head, pi_ref =
                                 # model.init (the SFT policy PPO starts from and is KL-penalised
                                 # against); see RewardModel. Not in the paper
    share_prompt: bool = True    # with data.mask_packed: a group's prompt is packed once, its K
                                 # completions as branches after it (collate_rankings); same scores
                                 # up to rounding, ~2.6x fewer tokens on the miniature RM data


@dataclass
class RMConfig:
    model: ModelSection = section(ModelSection)
    data: DataSection = section(lambda: DataSection(path=str(common.DATA / "rankings_oasst_en.jsonl"),
                                                    eval_fraction=0.1, seq_len=128))
    train: TrainConfig = section(lambda: TrainConfig(max_steps=0, batch_size=64, lr=9e-6, warmup_steps=0,
                                                     weight_decay=0.0, eval_every=0))
    rm: RMSection = section(RMSection)
    dist: DistSection = section(DistSection)


def group_rewards(m, batch):
    """Per-completion scores arranged as [B, Kmax] (padding 0) for ranking_loss; a packed batch
    (collate_rankings(pack_len=...)) reads sequence i at (row[i], last_idx[i]). Groups that
    carry "ref_loglik" (add_reference_logliks) add the RM's reference term."""
    rows = batch.row if batch.row is not None else torch.arange(len(batch.last_idx), device=batch.ids.device)
    ref = None
    if batch.ref_loglik is not None:  # placed where each sequence's score is read
        ref = torch.zeros(batch.ids.shape, dtype=torch.float32, device=batch.ids.device)
        ref[rows, batch.last_idx] = batch.ref_loglik.to(ref.device)
    s = m(batch.ids, segment_ids=batch.segment_ids, ref_loglik=ref, branch_ids=batch.branch_ids)
    return unflatten_groups(s[rows, batch.last_idx], batch.group_sizes)


@torch.no_grad()
def add_reference_logliks(ref, groups, pad_id, device, batch_size=64) -> None:
    """Give each encoded ranking group (engine.data.encode_rankings) "ref_loglik": per sequence,
    log pi_ref(completion + EOS | prompt) summed over its tokens, under the GPT `ref`."""
    flat = [(g, j) for g, item in enumerate(groups) for j in range(len(item["ids"]))]
    lls = reference_logliks(ref, [groups[g]["ids"][j] for g, j in flat],
                            [groups[g]["prompt_len"] for g, _ in flat], pad_id, device, batch_size)
    for item in groups:
        item["ref_loglik"] = [0.0] * len(item["ids"])
    for (g, j), v in zip(flat, lls):
        groups[g]["ref_loglik"][j] = v


@torch.no_grad()
def reference_logliks(ref, seqs, prompt_lens, pad_id, device, batch_size=64) -> list[float]:
    """log pi_ref(seq[P:] | seq[:P]) for each token list, in the order given. Batches hold
    sequences of similar length (sorted), so little of a batch is padding, and the LM head runs
    only from the batch's shortest prompt on (target_start): ~80% of the RM data's tokens are
    prompt, whose log-probs are never read."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), prompt_lens[i]))
    out = [0.0] * len(seqs)
    for c in range(0, len(order), batch_size):
        idx = order[c:c + batch_size]
        ids, tgt = _response_targets([seqs[i] for i in idx], [prompt_lens[i] for i in idx], pad_id)
        start = max(0, min(max(1, prompt_lens[i]) for i in idx) - 1)
        lp = ref(ids.to(device), tgt.to(device), target_start=start).float().sum(1).cpu().tolist()
        for i, v in zip(idx, lp):
            out[i] = v
    return out


def _response_targets(seqs, prompt_lens, pad_id):
    """Right-padded inputs seq[:-1] and targets seq[1:] with -100 (log-prob 0) outside each
    sequence's response: summing the model's target log-probs gives log p(response | prompt)."""
    T = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), T - 1), pad_id, dtype=torch.long)
    tgt = torch.full((len(seqs), T - 1), -100, dtype=torch.long)
    for i, (x, P) in enumerate(zip(seqs, prompt_lens)):
        P = max(1, P)
        ids[i, :len(x) - 1] = torch.as_tensor(x[:-1])
        tgt[i, P - 1:len(x) - 1] = torch.as_tensor(x[P:])
    return ids, tgt


@torch.no_grad()
def evaluate(rm, groups, pad_id, device, batch_size=32, pack_len=None, share_prompt=False) -> dict:
    """Pairwise accuracy and ranking loss over encoded groups (pack_len, share_prompt: see
    collate_rankings);
    an RM with a reference term needs groups with "ref_loglik" (add_reference_logliks)."""
    correct, pairs, loss_sum, n = 0.0, 0, 0.0, 0
    if getattr(rm, "ref_weight", 0.0) and groups and "ref_loglik" not in groups[0]:
        raise ValueError("this reward model adds a reference log-likelihood term: score the groups "
                         "with rm.add_reference_logliks(<its reference policy>, groups, ...) first")
    for c in range(0, len(groups), batch_size):
        b = collate_rankings(groups[c:c + batch_size], pad_id, pack_len, share_prompt).to(device)
        r = group_rewards(rm, b)
        rank = b.ranking.to(device)
        acc, k = ranking_accuracy(r, rank)
        correct, pairs = correct + float(acc) * int(k), pairs + int(k)
        loss_sum, n = loss_sum + float(ranking_loss(r, rank)) * len(rank), n + len(rank)
    return {"accuracy": correct / max(pairs, 1), "loss": loss_sum / max(n, 1), "pairs": pairs}


@torch.no_grad()
def normalize_bias(rm, demos, tok, T, device, batch_size=32, ref=None) -> float:
    """Shift the head bias so demonstrations score 0 on average (InstructGPT section 3.5);
    `ref`: the reference policy of an RM with a reference term (the whole score is centred)."""
    seqs = encode_sft(demos, tok, T)
    w = rm.ref_weight if ref is not None else 0.0
    scores = []
    by_len = sorted(seqs, key=lambda sm: len(sm[0]))  # little padding per batch; the mean is all we need
    for c in range(0, len(by_len), batch_size):
        chunk = by_len[c:c + batch_size]
        ids = torch.full((len(chunk), max(len(s) for s, _ in chunk)), tok.pad_id, dtype=torch.long)
        for i, (s, _) in enumerate(chunk):
            ids[i, :len(s)] = torch.tensor(s)
        last = torch.tensor([len(s) - 1 for s, _ in chunk])
        scores.append(rm.score_at(ids.to(device), last.to(device)).float().cpu())
    mean = float(torch.cat(scores).mean()) if scores else 0.0
    if w and seqs:  # the loss mask's first 1 is the response's first token
        lls = reference_logliks(ref, [s for s, _ in seqs], [m.index(1) for _, m in seqs], tok.pad_id, device)
        mean += w * sum(lls) / len(lls)
    rm.head.bias.sub_(mean)
    return mean


def reference_policy(cfg, tok, device, groups):
    """rm.ref_loglik: the reference policy (model.init, a GPT), after it has scored `groups`."""
    from engine.model import GPT
    if not cfg.model.init or common.model_class(cfg.model.init) != "GPT":
        raise SystemExit(f"rm.ref_loglik needs model.init to be the policy PPO starts from (a GPT, e.g. "
                         f"the SFT run), got {cfg.model.init!r}")
    # a whole copy on every rank, used for one forward pass over the data (not sharded)
    ref = common.build_model(cfg, tok, device, cls=GPT, compile=False).eval().requires_grad_(False)
    add_reference_logliks(ref, groups, tok.pad_id, device)
    return ref


def main(argv=None):
    cfg, out = common.parse(RMConfig, argv, "rm")
    return run(cfg, out)


def run(cfg: RMConfig, out: str) -> dict:
    device = common.setup(cfg, out)
    records = [r for p in cfg.data.path.split(",") if p for r in load_rankings(p)]
    tok = common.tokenizer(cfg, out, lambda: [r["prompt"] + "\n" + "\n".join(r["completions"]) for r in records])
    rm = common.build_model(cfg, tok, device, cls=RewardModel)
    T = min(cfg.data.seq_len, rm.cfg.block_size)
    # Split by prompt so no prompt of the eval set is trained on.
    g = torch.Generator().manual_seed(cfg.train.seed)
    perm = torch.randperm(len(records), generator=g).tolist()
    n_eval = int(len(records) * cfg.data.eval_fraction)
    groups = encode_rankings([records[i] for i in perm[n_eval:]], tok, T)
    eval_groups = encode_rankings([records[i] for i in perm[:n_eval]], tok, T)
    ref = reference_policy(cfg, tok, device, groups + eval_groups) if cfg.rm.ref_loglik else None
    if ref is not None:
        rm.loglik_weight.requires_grad_(True)  # learnt with the head (before wrap: DDP/FSDP see it)
    if cfg.train.max_steps <= 0:
        cfg.train.max_steps = max(1, math.ceil(len(groups) * cfg.rm.epochs / cfg.train.batch_size))
    n_pairs = sum(len(x["ranking"]) * (len(x["ranking"]) - 1) // 2 for x in groups)
    dist.print0(f"[rm] {len(groups)} prompts ({n_pairs} max pairs), {len(eval_groups)} held out; "
                f"{cfg.train.max_steps} steps of {cfg.train.batch_size} prompts")
    wrapped = common.wrap(cfg, rm, device)

    # with data.mask_packed the completions are packed into rows (segment ids), not padded
    pack_len = T if cfg.data.mask_packed else None
    share = cfg.rm.share_prompt and pack_len is not None

    def batch_fn(step, micro):
        rows = common.rows_for(cfg, len(groups), step, micro, trainer.micro_batch_size, trainer.accum)
        return collate_rankings([groups[i] for i in rows.tolist()], tok.pad_id, pack_len, share).to(device)

    def loss_fn(m, b):
        r = group_rewards(m, b)
        loss = ranking_loss(r, b.ranking)
        acc, _ = ranking_accuracy(r.detach(), b.ranking)
        return loss, {"accuracy": acc, "tokens": float(b.ids.numel())}

    eval_fn = (lambda m: evaluate(m, eval_groups, tok.pad_id, device, pack_len=pack_len, share_prompt=share)) if eval_groups else None
    trainer = Trainer(wrapped, cfg.train, out, loss_fn=loss_fn, batch_fn=batch_fn, eval_fn=eval_fn,
                      models={"model": rm}, device=device, desc="rm")
    info = trainer.fit()
    rm.eval()
    with trainer.autocast():  # score as PPO will: in the run's compute dtype, head in fp32
        result = evaluate(rm, eval_groups, tok.pad_id, device, pack_len=pack_len, share_prompt=share) if eval_groups else {}
        if cfg.rm.demos:
            result["demo_mean_before_shift"] = normalize_bias(rm, load_sft(cfg.rm.demos), tok, T, device, ref=ref)
    if ref is not None:
        result["ref_weight"] = rm.ref_weight
    common.export(rm, tok, out)
    dist.print0(f"[rm] done: step {trainer.step} train loss {info.get('loss', float('nan')):.4f} "
                f"held-out accuracy {result.get('accuracy', float('nan')):.3f}"
                + (f", reference log-likelihood weight {rm.ref_weight:.4f}" if ref is not None else "")
                + f" -> {out}/model")
    return {**info, **{f"eval_{k}": v for k, v in result.items()}}


def load_reward_model(path: str, device, dropout: float = 0.0, tok=None):
    """An RM run folder (uses its model/) or a RewardModel folder; dropout off by default
    (scoring, and PPO's value model, must be deterministic). Comma-separated paths: their
    RewardEnsemble (the mean score). With `tok`, a reward model trained with another tokenizer
    is refused (common.check_same_tokenizer)."""
    import os
    paths = [p for p in path.split(",") if p]
    if len(paths) > 1:
        return RewardEnsemble([load_reward_model(p, device, dropout, tok) for p in paths])
    sub = os.path.join(path, "model")
    try:
        rm = RewardModel.load(sub if os.path.isdir(sub) else path, map_location=device, dropout=dropout)
    except CheckpointError as e:
        raise SystemExit(f"error: reward model {path}: {e}") from None
    if tok is not None:
        common.check_same_tokenizer(tok, rm, path, "reward model")
    return rm


if __name__ == "__main__":
    common.cli(main)
