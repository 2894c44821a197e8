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

advantage_from="old" (sampled mode): A_i = lam lp_t + (1 - lam) lp_r - lp_old, the advantage from the
policy that sampled instead of the current lp_s (the paper authors' verl code); the same on-policy.

Reduction: "none" -> per-token [...]; "sum" -> sum_i loss_i; "mean" -> sum_i loss_i / D with
D = num_items_in_batch if given (the global token count under gradient accumulation) else the
number of valid tokens (at least 1, so an all-masked batch gives 0). The sequence reductions (verl's
loss_agg_mode names), with sequences j the rows of targets.reshape(-1, T), n_j their valid tokens:
"seq-mean-token-mean" -> sum_j (sum_{i in j} loss_i / max(n_j, 1)) / S, "seq-mean-token-sum" ->
sum_j sum_{i in j} loss_i / S, with S = num_sequences_in_batch if given (the global count) else the
number of sequences with n_j > 0 (at least 1).

Non-finite inputs (+-inf, NaN): one rule for every backend and for this reference
1. Masked tokens are not read: a token whose target is ignore_index adds 0 to the loss and gets a
   zero gradient row and zero diagnostics, whatever its logits and per-token inputs hold.
2. A logit of -inf means probability 0 (a masked vocabulary entry) and is exact: 0 * log 0 = 0, never
   NaN. A column where the student is -inf adds nothing to any sum over the vocabulary and gets
   gradient 0. A teacher / reference -inf gives log p = -inf there, which counts only where it is
   weighted: where p_s > 0 in full mode, at the target in sampled mode.
3. A model whose coefficient is 0 is not read by the loss or its gradient: the teacher at lam = 0, the
   reference at lam = 1 (the sampled-mode advantage is lam lp_t + (1 - lam) lp_r - lp_s with
   0 * x = 0 for any x, so lp_r = -inf cancels at lam = 1; the reward lam * (...) is 0 at lam = 0).
   The diagnostics that show such a model (lp_t, lp_r, kl) still show its values, finite or not.
4. Anything else is IEEE arithmetic, and no NaN is ever dropped: a NaN logit, a +inf logit (not a
   distribution: that model's log-probabilities are NaN), a row that is -inf everywhere, a weighted
   -inf log-probability (2.), or a non-finite per-token input (teacher_logprobs, ref_logprobs,
   old_logprobs, rollout_logprobs) that reaches the formula make that token's loss what the formula
   gives: +-inf where it gives an infinity (e.g. +inf for the KL to a teacher that rules out a token
   the student can emit, or for a sampled token the teacher rules out), NaN otherwise. A token whose
   loss is not finite gets a gradient row that is NaN in every entry (not a mix of +-inf, NaN and
   finite entries); other tokens are unaffected (a "mean" / "sum" loss is then non-finite too).
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
    """(loss, reward, kl) [n] of mode="topk" by explicit bucket log-masses: log P(id) = log p(id), and the
    tail's log P = logsumexp of log p over the columns outside the ids (exact at any size; -inf if empty)."""
    from .topk import TAIL_FLOOR

    in_ids = torch.zeros_like(logp_s, dtype=torch.bool).scatter_(1, ids, True)
    empty = in_ids.all(-1, keepdim=True)

    def log_mass(logp):
        outside = torch.where(in_ids, torch.full_like(logp, -math.inf), logp)
        # where() keeps the gradient finite when the tail is empty (a logsumexp over nothing).
        tail = torch.logsumexp(torch.where(empty, torch.zeros_like(logp), outside), -1, keepdim=True)
        return torch.cat([logp.gather(1, ids), torch.where(empty, torch.full_like(tail, -math.inf), tail)], 1)

    log_s, log_r = log_mass(logp_s), log_mass(logp_r.detach())
    log_t = torch.cat([lp_t, torch.log((1 - lp_t.exp().sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR))], 1)
    p_s = log_s.exp()
    live = p_s > 0
    c = log_s - _safe_times(lam, log_t) - _safe_times(1.0 - lam, log_r)
    zero = torch.zeros_like(c)
    loss = (p_s * torch.where(live, c, zero)).sum(-1)
    reward = _safe_times(lam, (p_s * torch.where(live, log_t - log_r, zero)).sum(-1))
    kl = (p_s * torch.where(live, log_s - log_r, zero)).sum(-1)
    return loss, reward.detach(), kl.detach()


def gopd_loss(student_logits, targets, teacher_logits=None, ref_logits=None, *,
              teacher_logprobs=None, ref_logprobs=None, lam=1.0, mode="sampled",
              old_logprobs=None, rollout_logprobs=None, clip_eps=0.2, clip_eps_high=None,
              dual_clip=3.0, is_cap=5.0, temperature=1.0, ignore_index=-100, reduction="mean",
              num_items_in_batch=None, teacher_topk_ids=None, teacher_topk_logprobs=None, advantage_from="current",
              num_sequences_in_batch=None) -> GOPDOutput:
    """Reference G-OPD loss; arguments as :func:`gopd_kernels.gopd_loss` (no validation here)."""
    lead = targets.shape
    vocab = student_logits.shape[-1]
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    ts, tt, tr = _per_model_temperatures(temperature)
    y = targets.reshape(-1)
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    nan = torch.full((), float("nan"), dtype=dtype, device=student_logits.device)
    undefined = []  # [N] bool, set below: tokens whose loss is not finite (rule 4)

    def rows(z):
        # Masked tokens are not read (rule 1): their logits are replaced by zeros before any math.
        z = z.reshape(-1, z.shape[-1])[:, :vocab].to(dtype)
        return torch.where(valid[:, None], z, torch.zeros((), dtype=dtype, device=z.device))

    def log_probs(z, temp):
        return torch.log_softmax(rows(z) / temp, dim=-1)

    def student_log_probs(z, temp):
        z = rows(z)
        if z.requires_grad:  # rule 4: the row of a token whose loss is not finite is NaN throughout
            z.register_hook(lambda g: None if g is None else torch.where(undefined[0][:, None], nan, g))
        return torch.log_softmax(z / temp, dim=-1)

    def at_target(logp):
        return logp.gather(1, y_safe[:, None]).squeeze(1)

    logp_s = student_log_probs(student_logits, ts)
    p_s = logp_s.exp()
    lp_s = at_target(logp_s)
    entropy = -torch.where(p_s != 0, p_s * logp_s, torch.zeros_like(p_s)).sum(-1).detach()

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
        reward = _safe_times(lam, lp_t - lp_r)
        kl = lp_s.detach() - lp_r
        # reward - kl, written so that a model with coefficient 0 is not read (rule 3)
        lp_policy = lp_old if advantage_from == "old" else lp_s
        adv = (_safe_times(lam, lp_t) + _safe_times(1.0 - lam, lp_r) - lp_policy).detach()
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
        full = (p_s * torch.where(p_s != 0, c, torch.zeros_like(c))).sum(-1)
        e_pt = torch.where(p_s != 0, p_s * logp_t, torch.zeros_like(p_s)).sum(-1)
        e_pr = torch.where(p_s != 0, p_s * logp_r, torch.zeros_like(p_s)).sum(-1)
        reward = _safe_times(lam, e_pt - e_pr).detach()
        kl = (-entropy - e_pr).detach()
        adv = None
        per_token = w * full

    zero = torch.zeros((), dtype=dtype, device=per_token.device)
    undefined.append(valid & ~torch.isfinite(per_token.detach()))
    per_token = torch.where(valid, per_token, zero)
    if reduction == "none":
        loss = per_token.reshape(lead)
    elif reduction == "sum":
        loss = per_token.sum()
    elif reduction in ("seq-mean-token-mean", "seq-mean-token-sum"):
        seq_loss = per_token.reshape(-1, lead[-1]).sum(-1)
        n_j = valid.reshape(-1, lead[-1]).sum(-1)
        if reduction == "seq-mean-token-mean":
            seq_loss = seq_loss / n_j.clamp(min=1)
        seqs = num_sequences_in_batch if num_sequences_in_batch is not None else (n_j > 0).sum().clamp(min=1)
        loss = seq_loss.sum() / seqs
    else:
        denom = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp(min=1)
        loss = per_token.sum() / denom

    def diag(x):
        return None if x is None else torch.where(valid, x.detach(), zero).reshape(lead)

    return GOPDOutput(loss=loss, lp_s=diag(lp_s), lp_t=diag(lp_t), lp_r=diag(lp_r), reward=diag(reward),
                      kl=diag(kl), advantage=diag(adv), entropy=diag(entropy), is_weight=diag(w))
