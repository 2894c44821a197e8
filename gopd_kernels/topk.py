"""mode="topk": the inputs of a teacher known only by its top-k log-probs (what an inference server returns).

Per valid token i the vocabulary is split into k + 1 buckets: the k given ids S_i (one bucket each) and
the tail (everything else). With log p_m = log_softmax(z_m / T_m) for the student s and reference r:
    log P_m(v) = log p_m(v) for v in S_i,   log P_m(tail) = log(1 - sum_{v in S_i} p_m(v))
    log P_t(v) = teacher_topk_logprobs,     log P_t(tail) = log max(1 - sum_k exp(lp_t), TAIL_FLOOR)
    c_b       = log P_s(b) - lam log P_t(b) - (1 - lam) log P_r(b)
    loss_i    = w_i * sum_b P_s(b) c_b      (terms with P_s(b) = 0 count 0, as in mode="full")
    reward_i  = lam * sum_b P_s(b) (log P_t(b) - log P_r(b)),  kl_i = sum_b P_s(b) (log P_s(b) - log P_r(b))
With k = V the tail is empty and the loss is mode="full"'s.

The mode runs through the row contract like the others: the backends' row kernels give lse_s / lse_r,
the log-probs at the k ids are O(N k) gathers (gopd_kernels.autograd.RowConfig.gather), the bucket
loss is per token (gopd_kernels.objective), and its gradient d loss_i / d z_s(v) = w_i p_s(v)
(c_b(v) - L_i) / T_s reaches the logits through rows_backward's dense term plus an O(N k) scatter.

The tail rule: a teacher whose top-k mass rounds to 1 (or more, by rounding) would put log 0 = -inf on the
tail and make the loss infinite wherever the student has tail mass. Its tail mass is floored at
TAIL_FLOOR = 2^-20 (about the fp32 rounding of a sum of k probabilities), so the tail costs at most
-lam log TAIL_FLOOR ~ 13.9 lam nats per unit of student tail mass, never inf / NaN.

This module validates the top-k inputs and holds the teacher's tail rule.
"""

from __future__ import annotations

import math

import torch

from . import _validate as check

TAIL_FLOOR = 2.0 ** -20


def check_args(mode, teacher_topk_ids, teacher_topk_logprobs, *, lead, vocab, targets, ignore_index, others):
    """Validates the top-k inputs (mode="topk") or refuses them in another mode. others: names of the
    arguments topk mode does not take, mapped to their values."""
    if mode != "topk":
        if teacher_topk_ids is not None or teacher_topk_logprobs is not None:
            raise ValueError(f"teacher_topk_ids / teacher_topk_logprobs are for mode='topk', not mode={mode!r}")
        return
    given = sorted(name for name, v in others.items() if v is not None)
    if given:
        raise ValueError(f"mode='topk' takes the teacher as teacher_topk_ids + teacher_topk_logprobs; "
                         f"{given} cannot be used with it")
    if teacher_topk_ids is None or teacher_topk_logprobs is None:
        raise ValueError("mode='topk' needs teacher_topk_ids and teacher_topk_logprobs ([..., k] each)")
    check.tensor("teacher_topk_ids", teacher_topk_ids, floating=False)
    check.tensor("teacher_topk_logprobs", teacher_topk_logprobs)
    for name, x in (("teacher_topk_ids", teacher_topk_ids), ("teacher_topk_logprobs", teacher_topk_logprobs)):
        if x.dim() != len(lead) + 1 or tuple(x.shape[:-1]) != tuple(lead):
            raise ValueError(f"{name}: expected shape {tuple(lead)} + (k,), got {tuple(x.shape)}")
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
                         f"{tuple(teacher_topk_logprobs.shape)} must have the same shape")
    k = teacher_topk_ids.shape[-1]
    if k < 1 or k > vocab:
        raise ValueError(f"teacher_topk_ids: k = {k} must be in [1, V = {vocab}]")
    check.same_device("targets", targets, teacher_topk_ids=teacher_topk_ids,
                      teacher_topk_logprobs=teacher_topk_logprobs)
    _check_values(teacher_topk_ids.reshape(-1, k), teacher_topk_logprobs.reshape(-1, k).double(),
                  (targets.reshape(-1) != ignore_index)[:, None], vocab)


def _check_values(ids, lps, valid, vocab):
    """The top-k values at valid tokens (masked rows may hold anything). While torch.compile traces, each
    check becomes torch._assert_async, evaluated when the graph runs (see _validate.compiling)."""
    bad_id = valid & ((ids < 0) | (ids >= vocab))
    srt = ids.sort(-1).values
    checks = [
        (bad_id, "teacher_topk_ids: an id is outside the vocabulary",
         lambda: f"teacher_topk_ids: id {int(ids[bad_id][0])} is outside the vocabulary [0, {vocab})"),
        (valid & (srt[:, 1:] == srt[:, :-1]).any(-1, keepdim=True), "teacher_topk_ids: an id appears twice",
         lambda: "teacher_topk_ids: an id appears twice at one position; the k ids must be distinct"),
        (valid & torch.isnan(lps), "teacher_topk_logprobs: NaN", lambda: "teacher_topk_logprobs: NaN"),
        (valid & (lps > 0), "teacher_topk_logprobs: a log-probability > 0", lambda: "teacher_topk_logprobs: log-probabilities must be <= 0, got "
                                    f"{float(torch.where(valid, lps, -math.inf).max())}"),
        (valid & (lps[:, 1:] > lps[:, :-1]).any(-1, keepdim=True), "teacher_topk_logprobs: not sorted descending",
         lambda: "teacher_topk_logprobs: must be sorted in descending order along the last dim (the teacher's "
                 "top-k, as a server returns them)"),
    ]
    mass = torch.logsumexp(torch.where(valid, lps, -math.inf), -1, keepdim=True).exp()
    checks.append((mass > 1 + 1e-3, "teacher_topk_logprobs: the top-k probabilities sum to more than 1", lambda: "teacher_topk_logprobs: the top-k probabilities sum to "
                                            f"{float(mass.max()):.6g} > 1"))
    for bad, short, message in checks:
        if check.compiling():
            torch._assert_async(~bad.any(), short)
        elif bool(bad.any()):
            raise ValueError(message())


def teacher_tail(lp_t: torch.Tensor) -> torch.Tensor:
    """[n] log P_t(tail) = log max(1 - sum_k exp(lp_t), TAIL_FLOOR), computed as log(-expm1(lse))."""
    rest = -torch.expm1(torch.logsumexp(lp_t, -1))
    return torch.log(torch.clamp(rest, min=TAIL_FLOOR))


def prepare(teacher_topk_ids, teacher_topk_logprobs, valid, vocab):
    """(ids [N, k] int64, log-probs [N, k] float64), flattened; masked rows (which may hold anything, e.g.
    padding) get harmless stand-ins: ids 0..k-1 and log-probs -log V. They count for nothing."""
    k = teacher_topk_ids.shape[-1]
    ids = teacher_topk_ids.reshape(-1, k).to(torch.int64)
    lps = teacher_topk_logprobs.reshape(-1, k).to(torch.float64)
    ids = torch.where(valid[:, None], ids, torch.arange(k, device=ids.device).expand_as(ids)).contiguous()
    lps = torch.where(valid[:, None], lps, torch.full_like(lps, -math.log(vocab))).contiguous()
    return ids, lps
