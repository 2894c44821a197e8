"""The per-token G-OPD objective on O(N) row statistics, shared by every backend.

The vocabulary-wide work (logsumexp, target gather, expectations under p_s) is done by a backend's
row kernel; what is left is elementwise over tokens: the advantage, the PPO ratio and clips, the
truncated importance weight, and the full-mode loss. Keeping it here, once, means every backend
computes the same function and differs only in the row kernel.
"""

from __future__ import annotations

import torch

from .backends import E_R, E_S, E_T, LP_R, LP_S, LP_T


def scaled(coef: float, x: torch.Tensor) -> torch.Tensor:
    """coef * x with 0 * (+-inf) = 0 (a model with weight 0 must not poison the sum)."""
    return torch.zeros_like(x) if coef == 0 else coef * x


def full_loss_from_stats(stats: torch.Tensor, lam: float) -> torch.Tensor:
    """L_i = E_ps[log p_s] - lam E_ps[log p_t] - (1 - lam) E_ps[log p_r] (unweighted full-mode loss)."""
    return stats[E_S] - scaled(lam, stats[E_T]) - scaled(1.0 - lam, stats[E_R])


def token_objective(lp_s, full_loss, stats, valid, *, mode, lam, has_ref_logits, teacher_logprobs,
                    ref_logprobs, old_logprobs, rollout_logprobs, clip_eps, clip_eps_high, dual_clip,
                    is_cap):
    """Per-token loss [N] (differentiable through lp_s / full_loss) and detached diagnostics.

    lp_s, full_loss: [N] outputs of the row op (differentiable); stats: [NSTATS, N] detached;
    valid: [N] bool; the optional per-token inputs are [N] tensors in the stats' dtype.
    """
    zero = torch.zeros((), dtype=stats.dtype, device=stats.device)
    lp_t = stats[LP_T] if teacher_logprobs is None else teacher_logprobs
    if has_ref_logits:
        lp_r = stats[LP_R]
    elif ref_logprobs is not None:
        lp_r = ref_logprobs
    else:  # lam == 1 without a reference: the student itself (detached) is the reference
        lp_r = stats[LP_S]
    lp_old = lp_s.detach() if old_logprobs is None else old_logprobs
    if rollout_logprobs is None:
        weight = torch.ones_like(stats[LP_S])
    else:
        weight = torch.clamp(torch.exp(lp_old - rollout_logprobs), max=is_cap)

    if mode == "sampled":
        reward = scaled(lam, lp_t - lp_r)
        kl = stats[LP_S] - lp_r
        # A = reward - kl = lam lp_t + (1 - lam) lp_r - lp_s, written so that a model whose coefficient
        # is 0 is not read (lp_r at lam = 1 cancels even when it is -inf; see reference.py, non-finite
        # inputs). Masked tokens: 0, not NaN from -inf.
        advantage = torch.where(valid, scaled(lam, lp_t) + scaled(1.0 - lam, lp_r) - stats[LP_S], zero)
        ratio = torch.exp(lp_s - lp_old)
        eps_high = clip_eps if clip_eps_high is None else clip_eps_high
        pg = torch.maximum(-advantage * ratio, -advantage * torch.clamp(ratio, 1 - clip_eps, 1 + eps_high))
        if dual_clip is not None:
            pg = torch.where(advantage < 0, torch.minimum(pg, -advantage * dual_clip), pg)
        per_token = weight * pg
    else:
        e_r = stats[E_R] if has_ref_logits else stats[E_S]
        reward = scaled(lam, stats[E_T] - e_r)
        kl = stats[E_S] - e_r
        advantage = None
        per_token = weight * full_loss

    per_token = torch.where(valid, per_token, zero)

    def diag(x):
        return None if x is None else torch.where(valid, x.detach(), zero)

    diagnostics = dict(lp_s=diag(stats[LP_S]), lp_t=diag(lp_t), lp_r=diag(lp_r), reward=diag(reward),
                       kl=diag(kl), advantage=diag(advantage), entropy=diag(-stats[E_S]),
                       is_weight=diag(weight))
    return per_token, diagnostics


def stat_free_gradients(valid, *, mode, old_logprobs, rollout_logprobs, is_cap, scale):
    """The [N] gradients (g_lp, g_loss) of scale * sum_i per_token_i w.r.t. (lp_s, full_loss) when
    they do not depend on the row statistics, else None.

    That is full mode without a weight built from the student's own log-prob: there
    per_token = w * L with w = min(exp(lp_old - lp_rollout), is_cap) detached (w = 1 without
    rollout_logprobs), so g_lp = 0 and g_loss = scale * w on valid tokens, 0 elsewhere. With
    rollout_logprobs but no old_logprobs, lp_old is the student's lp_s and w needs the statistics.
    The gradients are fp64, as autograd through token_objective gives them on fp64 statistics (w is
    computed in the inputs' dtype, as there). tests/test_objective.py checks the agreement.
    """
    if mode != "full" or (rollout_logprobs is not None and old_logprobs is None):
        return None
    if rollout_logprobs is None:
        weight = torch.ones(valid.shape, dtype=torch.float64, device=valid.device)
    else:
        weight = torch.clamp(torch.exp(old_logprobs - rollout_logprobs), max=is_cap).to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=valid.device)
    g_loss = torch.where(valid, weight * scale, zero)
    return torch.zeros_like(g_loss), g_loss
