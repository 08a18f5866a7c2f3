"""Training losses of the InstructGPT stages as small pure tensor functions.

Masks are 0/1 tensors (bool or float) with the shape of the tensor they select from. Masked
entries never contribute, not even a NaN: values there are replaced with 0 by `torch.where`
before any arithmetic, so padding may hold garbage (e.g. -inf log-probs).
Means over an empty mask are 0 (the denominator is clamped to 1), so a batch without any
valid token gives a zero loss instead of NaN.
"""
import torch
import torch.nn.functional as F

__all__ = ["masked_mean", "masked_var", "masked_whiten", "sft_loss", "lm_loss_from_logits",
           "ranking_loss", "ranking_accuracy", "ppo_policy_loss", "value_loss", "ptx_loss",
           "ppo_ptx_objective"]


# ----------------------------------------------------------------------------- checks

def _check_same_shape(**tensors):
    """Raise a ValueError naming the tensors if their shapes differ."""
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.shape != t0.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {name0} has shape "
                             f"{tuple(t0.shape)}; they must match")


def _check_ndim(name, t, ndim):
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


# ----------------------------------------------------------------------------- masked statistics

def masked_mean(x, mask, dim=None):
    """sum(x * m) / max(sum(m), 1) over `dim` (all entries if None).

    x and mask have the same shape; an empty mask gives 0.
    """
    _check_same_shape(x=x, mask=mask)
    m = mask.bool()
    xm = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        return xm.sum() / m.sum().clamp_min(1)
    return xm.sum(dim) / m.sum(dim).clamp_min(1)


def masked_var(x, mask, dim=None, unbiased=True):
    """Variance over the masked entries: sum(m * (x - mean)^2) / max(n - 1, 1) (n if not unbiased).

    n = sum(m). With n <= 1 the variance is 0 (there is no spread to measure).
    """
    _check_same_shape(x=x, mask=mask)
    m = mask.bool()
    mean = masked_mean(x, m, dim)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    centered = torch.where(m, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    n = m.sum() if dim is None else m.sum(dim)
    denom = (n - 1 if unbiased else n).clamp_min(1)
    sq = centered.square()
    return (sq.sum() if dim is None else sq.sum(dim)) / denom


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """Whiten over all masked entries of x (one global mean/std, as for PPO advantages).

        y = (x - mean) / sqrt(var + eps)          (shift_mean=True)
        y = (x - mean) / sqrt(var + eps) + mean   (shift_mean=False: scale only, keep the mean)

    mean and the unbiased var are taken over entries with mask 1; padding is 0 in the output.
    """
    m = mask.bool()
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return torch.where(m, y, torch.zeros((), dtype=y.dtype, device=y.device))


# ----------------------------------------------------------------------------- language modelling

def sft_loss(logp, loss_mask):
    """Token-level mean negative log-likelihood: -sum(m * logp) / sum(m).

    logp [B,T]: log-probability of each target token (e.g. from kernels.linear_logprobs);
    loss_mask [B,T]: 1 on the tokens that are trained (the response for SFT). The mean is over
    all trained tokens of the batch, so long responses weigh more than short ones.
    """
    _check_same_shape(logp=logp, loss_mask=loss_mask)
    return -masked_mean(logp, loss_mask)


def lm_loss_from_logits(logits, targets, ignore_index=-100):
    """Mean cross-entropy over targets != ignore_index: logits [..., V], targets [...] long.

    Materialises the fp32 log-softmax; for large vocabularies prefer kernels.linear_logprobs
    + sft_loss. All targets ignored -> 0.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits has shape {tuple(logits.shape)}, expected targets.shape + (V,) "
                         f"with targets of shape {tuple(targets.shape)}")
    # Low-precision logits are upcast: the log-softmax of fp16/bf16 logits loses too much.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                              ignore_index=ignore_index, reduction="sum")
    n = (targets != ignore_index).sum().clamp_min(1)
    return nll_sum / n


def ptx_loss(logp, mask):
    """Pretraining LM loss of PPO-ptx: -sum(m * logp) / sum(m) on pretraining text.

    The paper maximises gamma_ptx * E_{x ~ D_pretrain}[log pi(x)]; minimising, this enters as
    + gamma_ptx * ptx_loss (see ppo_ptx_objective). logp [B,T] are the policy's log-probs of the
    pretraining tokens, mask [B,T] 1 on real (non-padding) tokens.
    """
    _check_same_shape(logp=logp, mask=mask)
    return -masked_mean(logp, mask)


# ----------------------------------------------------------------------------- reward model

def _pair_mask(ranking):
    """[B,K,K] bool: pair (i, j) is valid iff both are real completions and rank_i < rank_j."""
    valid = ranking >= 0
    better = ranking.unsqueeze(2) < ranking.unsqueeze(1)
    return better & valid.unsqueeze(2) & valid.unsqueeze(1)


def _check_ranking(rewards, ranking):
    _check_ndim("rewards", rewards, 2)
    _check_same_shape(rewards=rewards, ranking=ranking)
    if ranking.dtype.is_floating_point or ranking.dtype == torch.bool:
        raise ValueError(f"ranking must be an integer tensor (0 = best, -1 = padding), "
                         f"got dtype {ranking.dtype}")
    if bool((ranking < -1).any()):
        raise ValueError("ranking holds values < -1; use -1 for padding and ranks >= 0")


def ranking_loss(rewards, ranking):
    """K-wise reward-model loss of InstructGPT (Ouyang et al. 2022, eq. 1).

    rewards [B,K] float: RM score of each completion; ranking [B,K] int: rank of each completion,
    0 = best, equal ranks are ties, -1 = padding (K varies per prompt).
    For prompt b, P_b = {(i, j): both real, ranking[b,i] < ranking[b,j]} (ties give no pair) and

        loss_b = -1/|P_b| * sum_{(i,j) in P_b} log sigmoid(r_bi - r_bj)
        loss   = mean of loss_b over prompts with |P_b| > 0          (0 if there are none)

    Without ties |P_b| = C(K_b, 2): all pairs of a prompt form one batch element, which is what
    keeps the RM from overfitting when the same completion appears in many pairs.
    """
    _check_ranking(rewards, ranking)
    pairs = _pair_mask(ranking)
    # Zero the padding scores first: garbage (even NaN) there must not leak into the gradient.
    r = torch.where(ranking >= 0, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    logsig = F.logsigmoid(r.unsqueeze(2) - r.unsqueeze(1))                      # [B,K,K]
    logsig = torch.where(pairs, logsig, torch.zeros((), dtype=logsig.dtype, device=logsig.device))
    n_pairs = pairs.sum((1, 2))                                                 # [B]
    loss_b = -logsig.sum((1, 2)) / n_pairs.clamp_min(1)
    has = n_pairs > 0
    return (loss_b * has).sum() / has.sum().clamp_min(1)


@torch.no_grad()
def ranking_accuracy(rewards, ranking):
    """Pair-weighted accuracy: (#valid pairs with r_i > r_j) / #valid pairs, and #valid pairs.

    Same pairs as ranking_loss; an equal score counts as wrong. -> (accuracy 0-d tensor, int).
    With no pairs the accuracy is 0.
    """
    _check_ranking(rewards, ranking)
    pairs = _pair_mask(ranking)
    correct = (rewards.unsqueeze(2) > rewards.unsqueeze(1)) & pairs
    n = int(pairs.sum())
    return correct.sum().float() / max(n, 1), n


# ----------------------------------------------------------------------------- PPO

def ppo_policy_loss(logp, old_logp, advantages, mask, clip=0.2):
    """Clipped PPO surrogate (Schulman et al. 2017), token-level mean over the mask.

        ratio_t = exp(logp_t - old_logp_t)
        loss    = sum_t m_t * max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - clip, 1 + clip)) / sum_t m_t

    All inputs [B,T]; old_logp and advantages are treated as constants (detached).
    -> (loss, stats) with detached scalars:
       clipfrac  = fraction of masked tokens where the clipped term is the larger one,
       approx_kl = mean of (ratio - 1) - log(ratio)  (k3 estimate of KL(pi_old || pi), >= 0),
       ratio     = mean ratio.
    """
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    m = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Padding is zeroed before exp so that garbage there cannot overflow into inf * 0 = NaN.
    log_ratio = torch.where(m, logp - old_logp.detach(), zero)
    adv = torch.where(m, advantages.detach(), zero)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(pg_unclipped, pg_clipped), m)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_clipped > pg_unclipped).float(), m),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, m),
            "ratio": masked_mean(ratio, m),
        }
    return loss, stats


def value_loss(values, old_values, returns, mask, clip=0.2):
    """Clipped value loss, token-level mean over the mask:

        V_clip = clip(V, V_old - clip, V_old + clip)
        loss   = 0.5 * sum_t m_t * max((V_t - R_t)^2, (V_clip_t - R_t)^2) / sum_t m_t

    All inputs [B,T]; old_values (rollout values) and returns are constants (detached).
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    m = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    # Padding is zeroed before any arithmetic: garbage there (inf, NaN) must not reach the
    # loss or, through 0 * inf in the backward, the gradient.
    v = torch.where(m, values, zero)
    old = torch.where(m, old_values.detach(), zero)
    ret = torch.where(m, returns.detach(), zero)
    v_clip = old + torch.clamp(v - old, -clip, clip)
    err = torch.maximum((v - ret).square(), (v_clip - ret).square())
    return 0.5 * masked_mean(err, m)


def ppo_ptx_objective(policy_loss, ptx_nll, gamma_ptx):
    """PPO-ptx loss to minimise: policy_loss + gamma_ptx * ptx_nll (paper eq. 2, negated).

    Ouyang et al. (App. C.4) compute the PPO gradient and the pretraining gradient in consecutive
    steps per minibatch and accumulate both into the same gradient buffer before one optimizer
    step; since gradients are linear this equals one backward of this sum, or two backwards of
    policy_loss and gamma_ptx * ptx_nll without zeroing grads in between.
    Each term is its own token mean: the paper draws 8x more pretraining examples than RL
    episodes (ptx_ratio = 8), so a minibatch of 64 episodes pairs with 512 pretraining
    sequences, and ptx_nll is the mean NLL over their tokens (ptx_loss). gamma_ptx = 27.8.
    The value loss is not part of this sum: the value function is a separate model.
    """
    return policy_loss + gamma_ptx * ptx_nll
