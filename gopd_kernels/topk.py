"""mode="topk": G-OPD against a teacher known only by its top-k log-probs (what an inference server returns).

Per valid token i the vocabulary is split into k + 1 buckets: the k given ids S_i (one bucket each) and
the tail (everything else). With log p_m = log_softmax(z_m / T_m) for the student s and reference r:
    log P_m(v) = log p_m(v) for v in S_i,   log P_m(tail) = logsumexp_{v not in S_i} log p_m(v)
    log P_t(v) = teacher_topk_logprobs,     log P_t(tail) = log max(1 - sum_k exp(lp_t), TAIL_FLOOR)
    c_b       = log P_s(b) - lam log P_t(b) - (1 - lam) log P_r(b)
    loss_i    = w_i * sum_b P_s(b) c_b      (terms with P_s(b) = 0 count 0, as in mode="full")
    reward_i  = lam * sum_b P_s(b) (log P_t(b) - log P_r(b)),  kl_i = sum_b P_s(b) (log P_s(b) - log P_r(b))
Gradient to the student only: d loss_i / d z_s(v) = w_i p_s(v) (c_{b(v)} - loss_i / w_i) / T_s, with b(v)
v's bucket, built chunk by chunk from the chunk's logits with gathers (no [N, V] tensor, no new kernel).
With k = V the tail is empty and the loss is mode="full"'s.

The tail rule: a teacher whose top-k mass rounds to 1 (or more, by rounding) would put log 0 = -inf on the
tail and make the loss infinite wherever the student has tail mass. Its tail mass is floored at
TAIL_FLOOR = 2^-20 (about the fp32 rounding of a sum of k probabilities), so the tail costs at most
-lam log TAIL_FLOOR ~ 13.9 lam nats per unit of student tail mass, never inf / NaN.

IS weights: w_i = min(exp(lp_s - lp_rollout), is_cap) with rollout_logprobs (detached), else 1.
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
    valid = targets.reshape(-1) != ignore_index
    ids = teacher_topk_ids.reshape(-1, k)[valid]
    lps = teacher_topk_logprobs.reshape(-1, k)[valid].double()
    if ids.numel() == 0:
        return
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        bad = ids[(ids < 0) | (ids >= vocab)][0]
        raise ValueError(f"teacher_topk_ids: id {int(bad)} is outside the vocabulary [0, {vocab})")
    srt = ids.sort(-1).values
    if bool((srt[:, 1:] == srt[:, :-1]).any()):
        raise ValueError("teacher_topk_ids: an id appears twice at one position; the k ids must be distinct")
    if bool(torch.isnan(lps).any()):
        raise ValueError("teacher_topk_logprobs: NaN")
    if bool((lps > 0).any()):
        raise ValueError(f"teacher_topk_logprobs: log-probabilities must be <= 0, got {float(lps.max())}")
    if bool((lps[:, 1:] > lps[:, :-1]).any()):
        raise ValueError("teacher_topk_logprobs: must be sorted in descending order along the last dim "
                         "(the teacher's top-k, as a server returns them)")
    mass = torch.logsumexp(lps, -1).exp()
    if bool((mass > 1 + 1e-3).any()):
        raise ValueError(f"teacher_topk_logprobs: the top-k probabilities sum to {float(mass.max()):.6g} > 1")


def teacher_tail(lp_t: torch.Tensor) -> torch.Tensor:
    """[n] log P_t(tail) = log max(1 - sum_k exp(lp_t), TAIL_FLOOR), computed as log(-expm1(lse))."""
    rest = -torch.expm1(torch.logsumexp(lp_t, -1))
    return torch.log(torch.clamp(rest, min=TAIL_FLOOR))


def _times(coef: float, x: torch.Tensor) -> torch.Tensor:
    """coef * x with 0 * (-inf) = 0."""
    return torch.zeros_like(x) if coef == 0 else coef * x


def bucket_rows(logp_s, logp_r, ids, lp_t, lam):
    """The bucket objective of rows (see the module docstring).

    logp_s, logp_r: [c, V] log-probs (logp_r may be logp_s); ids [c, k]; lp_t [c, k].
    Returns dict of [c] tensors loss (unweighted), reward, kl, and c_full [c, V] (c_{b(v)}), all detached
    unless logp_s carries grad (the reference differentiates through them)."""
    in_s = torch.zeros_like(logp_s, dtype=torch.bool).scatter_(1, ids, True)
    empty = in_s.all(-1, keepdim=True)   # k = V: no tail

    def tail(logp):
        # where() keeps the gradient finite when the tail is empty (a logsumexp over nothing).
        masked = torch.where(in_s, torch.full_like(logp, -math.inf), logp)
        lse = torch.logsumexp(torch.where(empty, torch.zeros_like(logp), masked), -1, keepdim=True)
        return torch.where(empty, torch.full_like(lse, -math.inf), lse)

    ls = torch.cat([logp_s.gather(1, ids), tail(logp_s)], 1)
    lr = torch.cat([logp_r.gather(1, ids), tail(logp_r)], 1)
    lt = torch.cat([lp_t.to(ls.dtype), teacher_tail(lp_t.to(ls.dtype))[:, None]], 1)
    p = ls.exp()
    c = ls - _times(lam, lt) - _times(1.0 - lam, lr)
    live = p > 0
    loss = (p * torch.where(live, c, torch.zeros_like(c))).sum(-1)
    reward = lam * (p * torch.where(live, lt - lr, torch.zeros_like(c))).sum(-1)
    kl = (p * torch.where(live, ls - lr, torch.zeros_like(c))).sum(-1)
    return dict(loss=loss, reward=reward.detach(), kl=kl.detach(), c=c, in_s=in_s)


def c_full(c: torch.Tensor, in_s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[c, V] c_{b(v)}: the tail's c everywhere, the ids' own c scattered over it."""
    out = c[:, -1:].expand(-1, in_s.shape[1]).clone()
    return out.scatter_(1, ids, c[:, :-1])


# ---------------------------------------------------------------------------- the chunked op
def _logits(h, w, b, a, e, vocab, dt):
    """[e - a, V] logits of rows a:e: h itself (logits given) or h @ w.T + b, in the math dtype."""
    if w is None:
        return h[a:e, :vocab].to(dt)
    z = h[a:e].to(dt) @ w[:vocab].to(dt).t()
    return z if b is None else z + b[:vocab].to(dt)


class _Rows:
    """What one chunk's rows need: the student's log-probs and the bucket objective."""

    def __init__(self, s, r, ids, lp_t, lam, temps, vocab, dt, a, e):
        ts, tr = temps
        self.logp_s = torch.log_softmax(_logits(*s, a, e, vocab, dt) / ts, -1)
        logp_r = self.logp_s if r[0] is None else torch.log_softmax(_logits(*r, a, e, vocab, dt) / tr, -1)
        self.logp_r = logp_r
        self.ids = ids[a:e]
        self.b = bucket_rows(self.logp_s, logp_r, self.ids, lp_t[a:e], lam)

    def grad_logits(self, coef, ts):
        """d (sum_i coef_i loss_i) / d z_s: coef_i p_s(v) (c_{b(v)} - loss_i) / T_s (0 where p_s(v) = 0)."""
        p = self.logp_s.exp()
        diff = c_full(self.b["c"], self.b["in_s"], self.ids) - self.b["loss"][:, None]
        return torch.where(p > 0, p * diff, torch.zeros_like(p)) * (coef[:, None] / ts)


class TopkLoss(torch.autograd.Function):
    """Per-token mode="topk" loss [n] (weighted by w) plus detached diagnostics; gradient to the student's
    (hidden, weight, bias), or its logits when weight is None. Backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, s_h, s_w, s_b, r_h, r_w, r_b, ids, lp_t, y, valid, rollout_lp, opts):
        dt, vocab, chunk = opts["dtype"], opts["vocab"], opts["chunk"]
        n = y.shape[0]
        out = {k: torch.zeros(n, dtype=dt, device=y.device) for k in ("loss", "lp_s", "lp_r", "reward", "kl",
                                                                      "entropy")}
        with torch.no_grad():
            for a in range(0, n, chunk):
                e = min(n, a + chunk)
                rows = _Rows((s_h, s_w, s_b), (r_h, r_w, r_b), ids, lp_t, opts["lam"], opts["temps"], vocab, dt,
                             a, e)
                ys = y[a:e, None]
                logp = rows.logp_s
                out["lp_s"][a:e] = logp.gather(1, ys)[:, 0]
                out["lp_r"][a:e] = rows.logp_r.gather(1, ys)[:, 0]
                out["loss"][a:e] = rows.b["loss"]
                out["reward"][a:e], out["kl"][a:e] = rows.b["reward"], rows.b["kl"]
                p = logp.exp()
                out["entropy"][a:e] = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
        if rollout_lp is not None:
            w = torch.clamp(torch.exp(out["lp_s"] - rollout_lp.to(dt)), max=opts["is_cap"])
        else:
            w = torch.ones(n, dtype=dt, device=y.device)
        zero = torch.zeros((), dtype=dt, device=y.device)
        w = torch.where(valid, w, zero)
        per_token = torch.where(valid, w * out["loss"], zero)
        ctx.save_for_backward(s_h, s_w, s_b, r_h, r_w, r_b, ids, lp_t, w)
        ctx.opts = opts
        diags = {k: torch.where(valid, v, zero) for k, v in out.items() if k != "loss"}
        ctx.mark_non_differentiable(*diags.values(), w)
        return (per_token, diags["lp_s"], diags["lp_r"], diags["reward"], diags["kl"], diags["entropy"], w)

    @staticmethod
    def backward(ctx, grad, *_):
        s_h, s_w, s_b, r_h, r_w, r_b, ids, lp_t, w = ctx.saved_tensors
        opts = ctx.opts
        dt, vocab, chunk = opts["dtype"], opts["vocab"], opts["chunk"]
        n = ids.shape[0]
        coef = (grad.to(dt) * w)
        g_h = torch.zeros(s_h.shape, dtype=dt, device=s_h.device)
        g_w = None if s_w is None else torch.zeros(s_w.shape, dtype=dt, device=s_w.device)
        g_b = None if s_b is None else torch.zeros(s_b.shape, dtype=dt, device=s_b.device)
        for a in range(0, n, chunk):
            e = min(n, a + chunk)
            with torch.no_grad():
                rows = _Rows((s_h, s_w, s_b), (r_h, r_w, r_b), ids, lp_t, opts["lam"], opts["temps"], vocab, dt,
                             a, e)
                g_z = rows.grad_logits(coef[a:e], opts["temps"][0])
                if s_w is None:
                    g_h[a:e, :vocab] = g_z
                else:
                    g_h[a:e] = g_z @ s_w[:vocab].to(dt)
                    g_w[:vocab] += g_z.t() @ s_h[a:e].to(dt)
                    if g_b is not None:
                        g_b[:vocab] += g_z.sum(0)
        cast = [None if g is None else g.to(x.dtype) for g, x in ((g_h, s_h), (g_w, s_w), (g_b, s_b))]
        return (*cast, None, None, None, None, None, None, None, None, None)


def topk_loss(s, r, teacher_topk_ids, teacher_topk_logprobs, targets, *, lam, temps, ignore_index, rollout_logprobs,
              is_cap, dtype, vocab, chunk):
    """Runs TopkLoss on flattened inputs. s / r: (hidden or logits [n, *], weight or None, bias or None).
    Returns (per_token [n], diagnostics dict of [n])."""
    y = targets.reshape(-1).to(torch.int64)
    valid = y != ignore_index
    k = teacher_topk_ids.shape[-1]
    ids = teacher_topk_ids.reshape(-1, k).to(torch.int64)
    lps = teacher_topk_logprobs.reshape(-1, k).to(dtype)
    # Masked rows may hold anything (padding): harmless stand-ins, they count for nothing.
    ids = torch.where(valid[:, None], ids, torch.arange(k, device=ids.device).expand_as(ids)).contiguous()
    lps = torch.where(valid[:, None], lps, torch.full_like(lps, -math.log(vocab))).contiguous()
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    opts = dict(dtype=dtype, vocab=vocab, chunk=chunk, lam=float(lam), temps=(temps[0], temps[2]), is_cap=is_cap)
    rl = None if rollout_logprobs is None else rollout_logprobs.reshape(-1)
    per_token, lp_s, lp_r, reward, kl, entropy, w = TopkLoss.apply(*s, *r, ids, lps, y_safe, valid, rl, opts)
    if r[0] is None:
        lp_r = lp_s   # no reference (lam = 1): the student itself, as in the other modes
    diags = dict(lp_s=lp_s, lp_t=None, lp_r=lp_r, reward=reward, kl=kl, advantage=None, entropy=entropy,
                 is_weight=w)
    return per_token, diags
