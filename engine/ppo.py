"""PPO-ptx math as pure functions: KL-shaped rewards, advantages, KL controllers, EMA, minibatches.

No model code and no training loop: the trainer calls these on rollout tensors [B,T] where
B = episodes and T = response positions, with a 0/1 mask marking real response tokens.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .losses import _check_ndim, _check_same_shape, masked_whiten

__all__ = ["PPOConfig", "kl_estimate", "shaped_rewards", "loo_center", "RunningMoments", "compute_advantages",
           "AdaptiveKLController", "FixedKLController", "ema_decay_at", "ema_update", "minibatch_indices"]


@dataclass
class PPOConfig:
    """PPO-ptx defaults of InstructGPT (Ouyang et al. 2022, App. C.4 unless noted)."""
    batch_size: int = 512             # episodes per PPO iteration (App. C.4; E.11: 512 best of 64..1024)
    minibatch_size: int = 64          # App. C.4 (E.11: 32 slightly better, 64 kept for GPU use)
    ppo_epochs: int = 1               # one pass over each batch (App. C.4)
    clip: float = 0.2                 # PPO ratio clip (App. C.4)
    value_clip: float = 0.2           # value clipping range: common default (TRL, DS-Chat, MOSS); not in the paper
    vf_coef: float = 1.0              # value model is separate with its own optimizer and lr, so no
                                      # balancing against the policy is needed; 1.0 leaves its loss as is
    gamma: float = 1.0                # no discount (App. C.4)
    lam: float = 0.95                 # GAE lambda: not stated in the paper; the common default (TRL, trlx, NeMo)
    beta: float = 0.02                # per-token KL reward coefficient (App. C.4; E.7: 0.01-0.02 optimal)
    kl_estimator: str = "k1"          # log pi - log pi_SFT, as written in the paper's objective (eq. 2)
    adaptive_kl: bool = False         # the paper uses a fixed beta
    kl_target: Optional[float] = None  # only for adaptive_kl (Ziegler et al. 2019 controller)
    kl_horizon: int = 10000           # adaptive controller horizon (Ziegler et al. 2019 default)
    ptx_coef: float = 27.8            # gamma of eq. 2 (App. C.4)
    ptx_ratio: int = 8                # pretraining examples per RL episode (App. C.4, E.11)
    ema_decay: float = 0.992          # policy weight EMA (App. C.4)
    ema_bias_correction: bool = True  # weight the SFT init out of the EMA (see ema_decay_at): with
                                      # 0.992 a 10-iteration run would otherwise export 92% SFT
    temperature: float = 1.0          # rollout sampling temperature (App. C.4)
    # policy lr is train.lr of the recipe: the paper's final value is not printed (swept
    # 2.55e-6..2.55e-5; > 8.05e-6 diverged without ptx); recipes default to 5e-6
    value_lr: float = 9e-6            # value model lr for 1.3B/6B policies (App. C.4; 5e-6 at 175B)
    warmup_iters: int = 10            # linear warmup from 0.1x lr over the first 10 iterations (App. C.4)
    samples_per_prompt: int = 1       # k episodes of each drawn prompt per batch; with k > 1 each RM score
                                      # is centred on the mean of its prompt's other k - 1 (loo_center).
                                      # Not in the paper (one episode per prompt; RLOO-style baseline)
    critic: bool = True               # False: no value model (V = 0, so with lam 1 the advantages are the
                                      # KL-shaped returns): with samples_per_prompt > 1 the group is the
                                      # baseline (RLOO, Ahmadian et al. 2024). Not in the paper
    critic_warmup: int = 0            # first iterations update only the value model (verl's critic_warmup;
                                      # not in the paper, whose 6B value model starts from a strong RM)
    warmup_from: float = 0.1          # warmup start factor (App. C.4)
    whiten_advantages: bool = True    # standard PPO practice (N implementation details; TRL, OpenRLHF)
    normalize_reward: bool = False    # paper instead bias-normalises the RM once before RL (Sec. 3.5.2)
    no_eos_penalty: float = 1.0       # subtracted from the RM score of a response cut at max_new_tokens:
                                      # the RM is trained on complete responses only (ending in EOS), so
                                      # its score at a truncated one's last token is out of distribution
                                      # (the "EOS trick", Huang et al. 2024; not in the paper; 0 = off)
    ref_weight_scale: float = 1.0     # PPO pays ref_weight_scale x the RM's weight w on log pi_SFT per token
                                      # (an RM with a reference term, RewardModel.ref_weight); > 1 trusts
                                      # SFT's likelihood more than the rankings did. Not in the paper
    max_new_tokens: int = 256         # rollout length budget for small runs; paper caps responses at ~1k (?)
    total_episodes: int = 256_000     # App. C.4 (more did not help, E.11)

    def __post_init__(self):
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of "
                             f"minibatch_size={self.minibatch_size}")
        if self.samples_per_prompt < 1 or self.batch_size % self.samples_per_prompt:
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt} must be >= 1 and divide "
                             f"batch_size={self.batch_size}")
        if not self.critic and self.critic_warmup:
            raise ValueError(f"critic_warmup={self.critic_warmup} needs critic=True (no value model to warm up)")
        if self.ref_weight_scale < 0:
            raise ValueError(f"ref_weight_scale={self.ref_weight_scale} must be >= 0")
        if self.kl_estimator not in _KL_KINDS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r}: expected one of {_KL_KINDS}")
        if self.adaptive_kl and self.kl_target is None:
            raise ValueError("adaptive_kl=True needs kl_target")


# ----------------------------------------------------------------------------- KL

_KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(logp, ref_logp, kind="k1"):
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020).

    With d = ref_logp - logp = log(pi_ref / pi) at the sampled token:
        k1 = -d                 unbiased, can be negative per sample
        k2 = d^2 / 2            biased, >= 0, low variance
        k3 = exp(d) - 1 - d     unbiased, >= 0, low variance
    Elementwise, same shape as the inputs.
    """
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    d = ref_logp - logp
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d.square()
    if kind == "k3":
        # expm1 keeps precision for small d; the clamp removes rounding just below 0.
        return (torch.expm1(d) - d).clamp_min(0.0)
    raise ValueError(f"kind={kind!r}: expected one of {_KL_KINDS}")


@torch.no_grad()
def shaped_rewards(scores, logp, ref_logp, mask, *, beta, kind="k1", kl=None, no_eos=None,
                   no_eos_penalty=0.0, ref_weight=0.0, ref_term_logp=None):
    """Per-token PPO rewards of InstructGPT: KL penalty on every token + RM score at the end.

        r_t = -beta * kl_t + ref_weight * ref_term_logp_t         for m_t = 1 (ref_term_logp: default ref_logp)
        r_t += score - no_eos_penalty * no_eos                   at t = last index with m_t = 1
        r_t = 0                                                   for m_t = 0

    ref_weight: the reward model's weight on the reference policy's log-likelihood of the
    response (recipes.rm, rm.ref_loglik: fitted to the rankings; 0 = none). That term of the RM's
    score, ref_weight * sum_t ref_logp_t, is paid token by token instead of at the end: the same
    return, but each token is credited with its own share. ref_term_logp [B,T] replaces
    ref_logp in it (the reference's log-probs at temperature 1 when the rollout's is not).

    scores [B] RM scores; logp, ref_logp, mask [B,T]; kl [B,T] optional: a given per-token KL
    (e.g. the exact one from kernels.linear_kl) replaces kl_estimate(logp, ref_logp, kind), and
    then logp/ref_logp may be None. no_eos [B] bool: rows whose response never emitted EOS.
    -> (rewards [B,T] fp32, kl_sum [B] = sum_t m_t * kl_t for logging). Rows with an all-zero
    mask get zeros. Rewards are targets, so no gradient flows.
    """
    _check_ndim("mask", mask, 2)
    B, T = mask.shape
    ref_term_logp = ref_logp if ref_term_logp is None else ref_term_logp
    if ref_weight and ref_term_logp is None:
        raise ValueError("shaped_rewards needs ref_logp when ref_weight is not 0")
    if kl is None:
        if logp is None or ref_logp is None:
            raise ValueError("shaped_rewards needs logp and ref_logp when kl is not given")
        _check_same_shape(mask=mask, logp=logp, ref_logp=ref_logp)
        kl = kl_estimate(logp.float(), ref_logp.float(), kind)
    else:
        _check_same_shape(mask=mask, kl=kl)
        kl = kl.float()
    if scores.shape != (B,):
        raise ValueError(f"scores must have shape ({B},) (one per row of mask), got {tuple(scores.shape)}")
    m = mask.bool()
    kl = torch.where(m, kl, torch.zeros((), device=kl.device))
    rewards = -beta * kl
    if ref_weight:
        _check_same_shape(mask=mask, ref_term_logp=ref_term_logp)
        rewards = rewards + ref_weight * torch.where(m, ref_term_logp.float(), torch.zeros((), device=kl.device))
    score = scores.float()
    if no_eos is not None:
        if no_eos.shape != (B,):
            raise ValueError(f"no_eos must have shape ({B},), got {tuple(no_eos.shape)}")
        score = score - no_eos_penalty * no_eos.float()
    # Last masked position per row (-1 if none); rows without tokens add nothing.
    pos = torch.arange(T, device=mask.device).expand(B, T)
    last = torch.where(m, pos, torch.full_like(pos, -1)).amax(dim=1)
    has = last >= 0
    rewards.scatter_add_(1, last.clamp_min(0).unsqueeze(1),
                         torch.where(has, score, torch.zeros_like(score)).unsqueeze(1))
    return rewards, kl.sum(dim=1)


# ----------------------------------------------------------------------------- reward normalisation

@torch.no_grad()
def loo_center(scores, k: int):
    """Each score minus the mean of the other k - 1 scores of its prompt (leave-one-out baseline,
    Kool et al. 2019; RLOO, Ahmadian et al. 2024). scores [B] hold B / k prompts' k episodes
    consecutively (rows i*k .. i*k+k-1 share a prompt):

        c_j = s_j - (sum_{i in group(j)} s_i - s_j) / (k - 1)  =  k / (k - 1) * (s_j - mean_group)

    Why: the K-choose-2 ranking loss sees only differences between completions of one prompt, so
    an RM's scores carry an arbitrary per-prompt offset; one episode per prompt leaves the value
    model to learn those offsets, and until it has, they are noise in every advantage. Centring
    within the prompt cancels them exactly. k = 1 returns the scores unchanged.
    """
    _check_ndim("scores", scores, 1)
    if k == 1:
        return scores
    if k < 1 or scores.shape[0] % k:
        raise ValueError(f"loo_center: {scores.shape[0]} scores are not groups of k={k}")
    g = scores.float().view(-1, k)
    return (g - (g.sum(1, keepdim=True) - g) / (k - 1)).view(-1).to(scores.dtype)


class RunningMoments:
    """Running mean and std of all values seen so far (RM scores), merged batch by batch.

    Uses the parallel-variance merge (Chan et al. 1979) in float64 Python scalars, so the result
    equals the mean / unbiased std of the concatenation of all batches. Used when
    PPOConfig.normalize_reward is on: update with a batch of scores, then normalize them.
    """

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0          # sum of squared deviations from the mean

    @property
    def std(self):
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    @torch.no_grad()
    def update(self, x):
        """Merge the values of tensor x (any shape) into the running moments."""
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        b_mean = float(x.mean())
        b_m2 = float((x - b_mean).square().sum())
        tot = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / tot
        self.m2 += b_m2 + delta * delta * self.count * n / tot
        self.count = tot

    def normalize(self, x, shift_mean=True, eps=1e-8, min_std=1e-6):
        """(x - mean) / (std + eps); with shift_mean=False only x / (std + eps).

        While the scores seen so far have no spread (std < min_std, e.g. a first batch of equal
        scores) there is no scale to measure, so x is only shifted, never multiplied by 1/eps.
        """
        y = x - self.mean if shift_mean else x
        std = self.std
        return y if std < min_std else y / (std + eps)

    def state_dict(self):
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state):
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


# ----------------------------------------------------------------------------- advantages

@torch.no_grad()
def compute_advantages(rewards, values, mask, *, gamma=1.0, lam=0.95, whiten=True):
    """GAE advantages and returns (Schulman et al. 2016) via kernels.gae, then whitening.

    On m_t = 1:  delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
                 A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    returns = A + V on the mask (from the unwhitened A, so the value target is unaffected);
    advantages are then whitened over all masked tokens of the batch if `whiten`.
    Padding is 0 in both outputs. rewards, values, mask [B,T] -> (advantages, returns) [B,T].
    """
    _check_ndim("rewards", rewards, 2)
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    import kernels  # lazy: the engine's math must import without building the kernels
    adv, ret = kernels.gae(rewards, values, mask, gamma=gamma, lam=lam)
    if whiten:
        adv = masked_whiten(adv, mask)
    return adv, ret


# ----------------------------------------------------------------------------- KL controllers

class FixedKLController:
    """Constant KL coefficient (InstructGPT: beta = 0.02)."""

    def __init__(self, kl_coef):
        self.value = float(kl_coef)

    def update(self, current_kl, n_steps):
        pass

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional KL controller of Ziegler et al. 2019 (Fine-tuning LMs from human preferences).

        err   = clip(current_kl / target - 1, -0.2, 0.2)
        value = value * (1 + err * n_steps / horizon)

    current_kl is the mean per-episode KL of the batch, n_steps the episodes in it.
    """

    def __init__(self, init_kl_coef, target, horizon):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target ({target}) and horizon ({horizon}) must be > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl, n_steps):
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self):
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state):
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


# ----------------------------------------------------------------------------- EMA and minibatches

def ema_decay_at(step: int, decay: float, bias_correction: bool = True) -> float:
    """The decay to use for EMA update number `step` (1-based).

    With bias correction the EMA after t updates is the normalised weighted average
        ema_t = sum_{i=1..t} decay^(t-i) theta_i / sum_{i=1..t} decay^(t-i)
    of the weights after each update (the initial weights get no weight), which the recursion
    ema_t = d_t ema_{t-1} + (1 - d_t) theta_t gives with d_t = decay (1 - decay^(t-1)) / (1 - decay^t)
    (d_1 = 0). For t >> 1 / (1 - decay), d_t -> decay. Without it: d_t = decay.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if not bias_correction or decay <= 0.0:
        return decay
    return decay * (1.0 - decay ** (step - 1)) / (1.0 - decay ** step)


@torch.no_grad()
def ema_update(ema_params, params, decay):
    """In place: ema = decay * ema + (1 - decay) * p, for each pair (paper decay 0.992).

    ema_params, params: two nn.Modules (their parameters(), in order) or two iterables of tensors.
    """
    if isinstance(ema_params, torch.nn.Module):
        ema_params = ema_params.parameters()
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    ema_params, params = list(ema_params), list(params)
    if len(ema_params) != len(params):
        raise ValueError(f"ema_params has {len(ema_params)} tensors but params has {len(params)}")
    for i, (e, p) in enumerate(zip(ema_params, params)):
        if e.shape != p.shape:
            raise ValueError(f"ema_params[{i}] has shape {tuple(e.shape)} but params[{i}] has "
                             f"shape {tuple(p.shape)}")
    if not ema_params:
        return
    weight = 1.0 - decay
    if all(e.dtype == p.dtype and e.device == p.device for e, p in zip(ema_params, params)):
        torch._foreach_lerp_(ema_params, params, weight)   # one fused launch per dtype/device group
    else:
        for e, p in zip(ema_params, params):
            e.lerp_(p.to(device=e.device, dtype=e.dtype), weight)


def minibatch_indices(n, minibatch_size, generator=None):
    """A random permutation of range(n) split into index tensors of minibatch_size.

    The last one is smaller when minibatch_size does not divide n.
    """
    if minibatch_size <= 0:
        raise ValueError(f"minibatch_size must be > 0, got {minibatch_size}")
    perm = torch.randperm(n, generator=generator)
    return list(perm.split(minibatch_size))
