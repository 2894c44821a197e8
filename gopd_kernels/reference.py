"""The oracle: G-OPD in plain PyTorch on materialised logits. Readable, float64-capable, never fast.

Every backend of ``gopd_kernels`` is tested against :func:`gopd_loss` here. It takes [..., V] logits
(any leading shape) and computes, per valid token i (target y_i != ignore_index), with
log p_m = log_softmax(z_m / T_m) for the student s, teacher t and reference r:

sampled (the paper's estimator, verl's implementation):
    lp_m      = log p_m(y_i)
    reward_i  = lam * (lp_t - lp_r);  kl_i = lp_s - lp_r;  A_i = reward_i - kl_i     (A detached)
    ratio_i   = exp(lp_s - lp_old)    (lp_old = old_logprobs, or lp_s detached: ratio = 1)
    pg_i      = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high)), and for A < 0
                min(pg_i, -A * dual_clip)
    w_i       = min(exp(lp_old - lp_rollout), is_cap)  (1 without rollout_logprobs)
    loss_i    = w_i * pg_i
full (exact token-level G-OPD over the vocabulary):
    c(v)      = log p_s(v) - lam log p_t(v) - (1 - lam) log p_r(v)
    loss_i    = w_i * sum_v p_s(v) c(v);  reward_i = lam * E_ps[log p_t - log p_r];
    kl_i      = KL(p_s || p_r);  (loss_i = w_i * (kl_i - reward_i))
topk (a teacher known by its top-k ids S_i and log-probs, k + 1 buckets: each id, and the tail):
    P_m(b)    = sum_{v in b} p_m(v) for the student and reference; P_t = the given top-k probabilities
                and the tail max(1 - their sum, TAIL_FLOOR) (gopd_kernels.topk documents the rule)
    loss_i    = w_i * sum_b P_s(b) [log P_s(b) - lam log P_t(b) - (1 - lam) log P_r(b)]

Without a reference (allowed only at lam == 1, where pi_r cancels) the reference is the student
itself, detached: kl = 0 and reward = -(unweighted loss). A teacher / reference vocabulary wider
than the student's (padding) is cut to the student's V. Masked tokens contribute nothing.

Reduction: "none" -> per-token [...]; "sum" -> sum_i loss_i; "mean" -> sum_i loss_i / D with
D = num_items_in_batch if given (the global token count under gradient accumulation) else the
number of valid tokens (at least 1, so an all-masked batch gives 0).
"""

from __future__ import annotations

import math

import torch

from ._output import GOPDOutput


def _per_model_temperatures(temperature):
    if isinstance(temperature, (tuple, list)):
        return tuple(float(t) for t in temperature)
    return (float(temperature),) * 3


def _safe_times(coef, logp):
    """coef * logp with the convention 0 * (-inf) = 0."""
    coef = torch.as_tensor(coef, dtype=logp.dtype, device=logp.device)
    return torch.where(coef == 0, torch.zeros_like(logp), coef * logp)


def _topk_buckets(logp_s, logp_r, ids, lp_t, lam):
    """(loss, reward, kl) [n] of mode="topk" by explicit bucket sums: P(b) = scatter_add of p(v) over v's bucket."""
    from .topk import TAIL_FLOOR

    n, vocab = logp_s.shape
    k = ids.shape[1]
    bucket = torch.full((n, vocab), k, dtype=torch.long, device=ids.device)
    bucket.scatter_(1, ids, torch.arange(k, device=ids.device).expand(n, k))

    def mass(logp):
        return torch.zeros(n, k + 1, dtype=logp.dtype, device=logp.device).scatter_add(1, bucket, logp.exp())

    p_s, p_r = mass(logp_s), mass(logp_r.detach())
    q_t = lp_t.exp()
    p_t = torch.cat([q_t, (1 - q_t.sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR)], 1)
    live = p_s > 0
    log_s = torch.log(torch.where(live, p_s, torch.ones_like(p_s)))   # log 0 never enters the graph
    log_t, log_r = torch.log(p_t), torch.log(p_r)
    c = log_s - _safe_times(lam, log_t) - _safe_times(1.0 - lam, log_r)
    zero = torch.zeros_like(c)
    loss = (p_s * torch.where(live, c, zero)).sum(-1)
    reward = lam * (p_s * torch.where(live, log_t - log_r, zero)).sum(-1)
    kl = (p_s * torch.where(live, log_s - log_r, zero)).sum(-1)
    return loss, reward.detach(), kl.detach()


def gopd_loss(student_logits, targets, teacher_logits=None, ref_logits=None, *,
              teacher_logprobs=None, ref_logprobs=None, lam=1.0, mode="sampled",
              old_logprobs=None, rollout_logprobs=None, clip_eps=0.2, clip_eps_high=None,
              dual_clip=3.0, is_cap=5.0, temperature=1.0, ignore_index=-100, reduction="mean",
              num_items_in_batch=None, teacher_topk_ids=None, teacher_topk_logprobs=None) -> GOPDOutput:
    """Reference G-OPD loss; arguments as :func:`gopd_kernels.gopd_loss` (no validation here)."""
    lead = targets.shape
    vocab = student_logits.shape[-1]
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    ts, tt, tr = _per_model_temperatures(temperature)
    y = targets.reshape(-1)
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y))

    def log_probs(z, temp):
        return torch.log_softmax(z.reshape(-1, z.shape[-1])[:, :vocab].to(dtype) / temp, dim=-1)

    def at_target(logp):
        return logp.gather(1, y_safe[:, None]).squeeze(1)

    logp_s = log_probs(student_logits, ts)
    p_s = logp_s.exp()
    lp_s = at_target(logp_s)
    entropy = -torch.where(p_s > 0, p_s * logp_s, torch.zeros_like(p_s)).sum(-1).detach()

    logp_t = log_probs(teacher_logits, tt).detach() if teacher_logits is not None else None
    logp_r = log_probs(ref_logits, tr).detach() if ref_logits is not None else None
    if ref_logits is None and ref_logprobs is None:
        logp_r = logp_s.detach()  # lam == 1: any reference cancels; the student's own is the natural one
    lp_t = at_target(logp_t) if logp_t is not None else (
        None if teacher_logprobs is None else teacher_logprobs.reshape(-1).to(dtype))
    lp_r = at_target(logp_r) if logp_r is not None else ref_logprobs.reshape(-1).to(dtype)

    lp_old = old_logprobs.reshape(-1).to(dtype) if old_logprobs is not None else lp_s.detach()
    if rollout_logprobs is not None:
        w = torch.clamp(torch.exp(lp_old - rollout_logprobs.reshape(-1).to(dtype)), max=is_cap)
    else:
        w = torch.ones_like(lp_s)

    if mode == "sampled":
        reward = lam * (lp_t - lp_r)
        kl = lp_s.detach() - lp_r
        adv = (reward - kl).detach()
        ratio = torch.exp(lp_s - lp_old)
        eps_high = clip_eps if clip_eps_high is None else clip_eps_high
        pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_eps, 1 + eps_high))
        if dual_clip is not None:
            pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip), pg)
        per_token = w * pg
    elif mode == "topk":
        k = teacher_topk_ids.shape[-1]
        ids = teacher_topk_ids.reshape(-1, k)
        lps = teacher_topk_logprobs.reshape(-1, k).to(dtype)
        # Masked rows may hold anything: give them harmless ids / log-probs (they count for nothing).
        ids = torch.where(valid[:, None], ids, torch.arange(k, device=ids.device).expand_as(ids))
        lps = torch.where(valid[:, None], lps, torch.full_like(lps, -math.log(vocab)))
        loss_b, reward, kl = _topk_buckets(logp_s, logp_r, ids, lps, lam)
        adv = None
        per_token = w * loss_b
    else:
        c = logp_s - _safe_times(lam, logp_t) - _safe_times(1.0 - lam, logp_r)
        # Mask c (not p_s * c): a where() over p_s * (-inf) would send NaN into the backward pass.
        full = (p_s * torch.where(p_s > 0, c, torch.zeros_like(c))).sum(-1)
        e_pt = torch.where(p_s > 0, p_s * logp_t, torch.zeros_like(p_s)).sum(-1)
        e_pr = torch.where(p_s > 0, p_s * logp_r, torch.zeros_like(p_s)).sum(-1)
        reward = (lam * (e_pt - e_pr)).detach()
        kl = (-entropy - e_pr).detach()
        adv = None
        per_token = w * full

    zero = torch.zeros((), dtype=dtype, device=per_token.device)
    per_token = torch.where(valid, per_token, zero)
    if reduction == "none":
        loss = per_token.reshape(lead)
    elif reduction == "sum":
        loss = per_token.sum()
    else:
        denom = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp(min=1)
        loss = per_token.sum() / denom

    def diag(x):
        return None if x is None else torch.where(valid, x.detach(), zero).reshape(lead)

    return GOPDOutput(loss=loss, lp_s=diag(lp_s), lp_t=diag(lp_t), lp_r=diag(lp_r), reward=diag(reward),
                      kl=diag(kl), advantage=diag(adv), entropy=diag(entropy), is_weight=diag(w))
