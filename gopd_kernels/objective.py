"""The per-token G-OPD objective of every mode on O(N) row statistics, and the reductions.

The vocabulary-wide work (logsumexp, target gather, expectations under p_s) is done by a backend's
row kernel; mode="topk" adds O(N k) gathers of the student's and reference's log-probs at the teacher's
ids (``gopd_kernels.autograd.RowConfig.gather``). What is left is elementwise over tokens (or over a
token's k + 1 top-k buckets): the advantage, the PPO ratio and clips, the truncated importance weight,
the full-mode and top-k losses. Keeping it here, once, means every backend computes the same function
and differs only in the row kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from ._layout import E_R, E_S, E_T, LP_R, LP_S, LP_T
from ._options import Options
from .topk import teacher_tail


class Rows(NamedTuple):
    """What the row op gives per token: lp_s [N] and the full-mode loss L [N] (differentiable), the
    detached stats [NSTATS, N], and for mode="topk" the student's (differentiable) and reference's bucket
    log-masses, [N, k + 1] each: log p at the teacher's k ids, then log P(tail) ([N, 0] in the other
    modes, or for the reference when there is none)."""

    lp_s: torch.Tensor
    full: torch.Tensor
    stats: torch.Tensor
    lpk_s: torch.Tensor
    lpk_r: torch.Tensor


@dataclass(frozen=True)
class TokenInputs:
    """The optional per-token inputs of a call, flattened to [N] (topk_logprobs: [N, k]) in float64, the
    statistics' precision; has_ref: whether the reference was given as logits / a head"""

    has_ref: bool
    teacher_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    old_logprobs: Optional[torch.Tensor] = None
    rollout_logprobs: Optional[torch.Tensor] = None
    topk_logprobs: Optional[torch.Tensor] = None

    def rows(self, sl: slice) -> "TokenInputs":
        def cut(x):
            return None if x is None else x[sl]

        return TokenInputs(self.has_ref, cut(self.teacher_logprobs), cut(self.ref_logprobs), cut(self.old_logprobs),
                           cut(self.rollout_logprobs), cut(self.topk_logprobs))


def scaled(coef: float, x: torch.Tensor) -> torch.Tensor:
    """coef * x with 0 * (+-inf) = 0 (a model with weight 0 must not poison the sum)."""
    return torch.zeros_like(x) if coef == 0 else coef * x


def full_loss_from_stats(stats: torch.Tensor, lam: float) -> torch.Tensor:
    """L_i = E_ps[log p_s] - lam E_ps[log p_t] - (1 - lam) E_ps[log p_r] (unweighted full-mode loss)."""
    return stats[E_S] - scaled(lam, stats[E_T]) - scaled(1.0 - lam, stats[E_R])


def _where(cond, x, zero):
    return torch.where(cond, x, zero)


def _sampled(rows, lp_t, lp_r, lp_old, valid, opts, zero):
    """(per-token PPO loss before the IS weight, reward, kl, advantage) of mode="sampled"."""
    lam, stats = opts.lam, rows.stats
    reward = scaled(lam, lp_t - lp_r)
    kl = stats[LP_S] - lp_r
    # The policy's own log-prob in the advantage: the current one, or the sampling policy's.
    lp_pol = lp_old.detach() if opts.advantage_from == "old" else stats[LP_S]
    # A = lam lp_t + (1 - lam) lp_r - lp_pol, written so that a model whose coefficient is 0 is not read
    # (lp_r at lam = 1 cancels even when it is -inf; see reference.py, non-finite inputs). Masked: 0.
    advantage = _where(valid, scaled(lam, lp_t) + scaled(1.0 - lam, lp_r) - lp_pol, zero)
    ratio = torch.exp(rows.lp_s - lp_old)
    pg = torch.maximum(-advantage * ratio,
                       -advantage * torch.clamp(ratio, 1 - opts.clip_eps, 1 + opts.clip_eps_high))
    if opts.dual_clip is not None:
        pg = torch.where(advantage < 0, torch.minimum(pg, -advantage * opts.dual_clip), pg)
    return pg, reward, kl, advantage


def _topk(rows, valid, opts, inputs, zero):
    """(per-token loss before the IS weight, reward, kl) of mode="topk": full mode over k + 1 buckets.

    log P_s(b), log P_r(b): the student's / reference's bucket log-masses (rows.lpk_s / lpk_r); log P_t(b):
    the given top-k log-probs and the teacher's tail (floored, gopd_kernels.topk). Terms with P_s(b) = 0
    count 0. The student's gradient reaches the logits through lpk_s (RowConfig.backward_with_ids)."""
    keep = valid[:, None]
    stand_in = torch.full((), -math.log(rows.lpk_s.shape[1] + 1), dtype=rows.stats.dtype, device=valid.device)
    # Masked rows hold stand-ins before any math, so neither their values nor their gradient can be NaN.
    ls = torch.where(keep, rows.lpk_s, stand_in)
    lr = ls.detach() if not inputs.has_ref else torch.where(keep, rows.lpk_r, stand_in)
    lpk_t = inputs.topk_logprobs
    lt = torch.cat([lpk_t, teacher_tail(lpk_t)[:, None]], -1)
    p = ls.exp()
    live = p > 0
    none = torch.zeros_like(p)
    c = ls - scaled(opts.lam, lt) - scaled(1.0 - opts.lam, lr)
    loss = (p * torch.where(live, c, none)).sum(-1)
    reward = scaled(opts.lam, (p * torch.where(live, lt - lr, none)).sum(-1))
    kl = (p * torch.where(live, ls - lr, none)).sum(-1)
    return loss, reward, kl


def token_objective(rows: Rows, valid: torch.Tensor, opts: Options, inputs: TokenInputs):
    """Per-token loss [N] (differentiable through rows.lp_s / full / lpk_s) and detached diagnostics.

    valid: [N] bool. Every mode: loss_i = w_i * (mode's loss)_i, w_i = min(exp(lp_old - lp_rollout), is_cap)."""
    stats = rows.stats
    zero = torch.zeros((), dtype=stats.dtype, device=stats.device)
    lp_t = stats[LP_T] if inputs.teacher_logprobs is None else inputs.teacher_logprobs
    if inputs.has_ref:
        lp_r = stats[LP_R]
    elif inputs.ref_logprobs is not None:
        lp_r = inputs.ref_logprobs
    else:  # lam == 1 without a reference: the student itself (detached) is the reference
        lp_r = stats[LP_S]
    lp_old = rows.lp_s.detach() if inputs.old_logprobs is None else inputs.old_logprobs
    if inputs.rollout_logprobs is None:
        weight = torch.ones_like(stats[LP_S])
    else:
        weight = torch.clamp(torch.exp(lp_old - inputs.rollout_logprobs), max=opts.is_cap)

    advantage = None
    if opts.mode == "sampled":
        loss, reward, kl, advantage = _sampled(rows, lp_t, lp_r, lp_old, valid, opts, zero)
    elif opts.mode == "topk":
        loss, reward, kl = _topk(rows, valid, opts, inputs, zero)
        lp_t = None  # the teacher's log-prob of the target is not known in general
    else:
        e_r = stats[E_R] if inputs.has_ref else stats[E_S]
        reward = scaled(opts.lam, stats[E_T] - e_r)
        kl = stats[E_S] - e_r
        loss = rows.full
    per_token = _where(valid, weight * loss, zero)

    def diag(x):
        return None if x is None else _where(valid, x.detach(), zero)

    diagnostics = dict(lp_s=diag(stats[LP_S]), lp_t=diag(lp_t), lp_r=diag(lp_r), reward=diag(reward),
                       kl=diag(kl), advantage=diag(advantage), entropy=diag(-stats[E_S]), is_weight=diag(weight))
    return per_token, diagnostics


def token_scale(valid: torch.Tensor, lead: tuple, opts: Options) -> torch.Tensor:
    """d loss / d per_token_i of a scalar reduction, so that loss = sum_i scale_i per_token_i (float64):

    sum: 1. mean: 1 / D, D = num_items_in_batch, else the valid tokens (at least 1).
    seq-mean-token-sum: 1 / S; seq-mean-token-mean: 1 / (n_j S) for a token of sequence j with n_j valid
    tokens. Sequences are the rows of targets.reshape(-1, T) (T = its last dim); S = num_sequences_in_batch,
    else the sequences with at least one valid token (at least 1)."""
    ones = valid.to(torch.float64)
    if opts.reduction == "sum":
        return torch.ones((), dtype=torch.float64, device=valid.device)
    if opts.reduction == "mean":
        return 1.0 / _count(opts.denominator, ones.sum().clamp(min=1), valid.device)
    per_seq = valid.reshape(-1, lead[-1]).to(torch.float64)
    n_j = per_seq.sum(-1, keepdim=True)
    seqs = _count(opts.denominator, (n_j > 0).sum().to(torch.float64).clamp(min=1), valid.device)
    if opts.reduction == "seq-mean-token-sum":
        return (1.0 / seqs).expand(valid.shape)
    return (1.0 / (n_j.clamp(min=1) * seqs)).expand_as(per_seq).reshape(-1)


def _count(given, local, device):
    if given is None:
        return local
    if isinstance(given, torch.Tensor):
        return given.to(device=device, dtype=torch.float64).reshape(())
    return torch.tensor(float(given), dtype=torch.float64, device=device)


def reduce(per_token: torch.Tensor, valid: torch.Tensor, lead: tuple, opts: Options) -> torch.Tensor:
    """The loss of opts.reduction: per-token [lead] for "none", else sum_i scale_i per_token_i."""
    if opts.reduction == "none":
        return per_token.reshape(lead)
    scale = token_scale(valid, lead, opts)
    return (per_token * scale).sum() if scale.dim() else per_token.sum() * scale


def stat_free_gradients(valid, opts: Options, inputs: TokenInputs, scale):
    """The [N] gradients (g_lp, g_loss) of sum_i scale_i per_token_i w.r.t. (lp_s, full_loss) when they do
    not depend on the row statistics, else None.

    That is full mode without a weight built from the student's own log-prob: there
    per_token = w * L with w = min(exp(lp_old - lp_rollout), is_cap) detached (w = 1 without
    rollout_logprobs), so g_lp = 0 and g_loss = scale * w on valid tokens, 0 elsewhere. With
    rollout_logprobs but no old_logprobs, lp_old is the student's lp_s and w needs the statistics.
    The gradients are fp64, as autograd through token_objective gives them on fp64 statistics.
    tests/test_objective.py checks the agreement.
    """
    if opts.mode != "full" or (inputs.rollout_logprobs is not None and inputs.old_logprobs is None):
        return None
    if inputs.rollout_logprobs is None:
        weight = torch.ones(valid.shape, dtype=torch.float64, device=valid.device)
    else:
        weight = torch.clamp(torch.exp(inputs.old_logprobs - inputs.rollout_logprobs), max=opts.is_cap)
    zero = torch.zeros((), dtype=torch.float64, device=valid.device)
    g_loss = torch.where(valid, weight.to(torch.float64) * scale, zero)
    return torch.zeros_like(g_loss), g_loss
