"""Vocab-parallel (tensor-parallel) LM heads: each rank holds a contiguous slice of every head's vocabulary.

Rank r of ``group`` holds rows [start_r, start_r + V_r) of the student's, teacher's and reference's
LM-head weights (in rank order; sizes may differ between ranks, and are learnt with one all-gather).
Hidden states and targets (ids in the global vocabulary) are the same on every rank. Each rank runs the
backend's row kernels on its own [chunk, V_r] logits; the per-row statistics of the contract
(gopd_kernels/backends/__init__.py) are then combined exactly, with three all-reduces of O(chunk)
floats per chunk and never an [N, V] gather:

    lse_m      = log sum_r exp(lse_m^r)                                  (max, then sum of exp)
    LP_m       = (LP_m^o + lse_m^o) - lse_m                              (o: the rank that owns the target)
    E_m        = sum_r w_r (E_m^r + lse_m^r - lse_m),  w_r = exp(lse_s^r - lse_s)

(E_m^r is the expectation under the student's distribution renormalised on rank r's slice, and w_r the
student's mass on that slice.) Every rank then has the same statistics, hence the same per-token loss,
diagnostics and upstream gradients. Its backward writes the logit gradient of its own columns from
those global statistics; a rank that does not own a row's target passes a stand-in target (column 0)
to the kernel and takes back the one-hot term it added. dH is the sum of the ranks' partial dH
(all-reduced), and dW / db are each rank's own slice.

The loss term of the backward, p(v) (c(v) - L), needs the row's loss L. The contract's backends take L
from the statistics, but the C++ CPU kernel sums L = sum_v p(v) c(v) over the row it is given (a
precision choice), which on a slice is only the slice's share L_r = w_r (sum of the slice's re-based
E_m terms). So the backward hands every kernel statistics whose E rows spell L_r (E_S = L_r, E_T = E_R
= 0; the lse rows stay global) and moves the difference into the one-hot-free part of the g_lp term:
    p (g_loss (c - L) - g_lp) = p (g_loss (c - L_r) - g_lp'),   g_lp' = g_lp + g_loss (L - L_r),
then takes back the one-hot term g_lp' / T_s the kernel added at the target (or stand-in) column and
adds the true g_lp / T_s at the owner's target. Both kinds of kernel then give the same, exact gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._layout import E_R, E_S, E_T, LP_R, LP_S, LP_T, LSE_R, LSE_S, LSE_T
from .autograd import RowConfig


def shard_layout(group, local_vocab: int, device) -> tuple[int, int]:
    """(start of this rank's slice, global vocabulary size) from every rank's slice size (one all-gather)."""
    size = torch.tensor([local_vocab], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    if min(sizes) < 1:
        raise ValueError(f"vocab_parallel_group: every rank must hold at least one vocabulary row; sizes {sizes}")
    return sum(sizes[:rank]), sum(sizes)


def check_group(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_parallel_group: torch.distributed is not initialised (init_process_group first)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"vocab_parallel_group: expected a torch.distributed ProcessGroup, got {type(group).__name__}")


class VocabParallelRowConfig(RowConfig):
    """RowConfig whose row kernels see one vocabulary slice and whose statistics are the global ones."""

    def __init__(self, backend, lam, temperatures, ignore_index, group, start: int, local_vocab: int):
        super().__init__(backend, lam, temperatures, ignore_index)
        self.group, self.start, self.local_vocab = group, start, local_vocab

    has_forward_backward = False  # its gradients need the global statistics, known only after the forward

    def _local_targets(self, targets):
        """(targets as columns of this slice, stand-in 0 where another rank owns them; owner mask; valid mask)."""
        valid = targets != self.ignore_index
        local = targets - self.start
        owner = valid & (local >= 0) & (local < self.local_vocab)
        return torch.where(owner, local, torch.where(valid, torch.zeros_like(local), targets)), owner, valid

    def forward(self, zs, zt, zr, targets):
        local_y, owner, valid = self._local_targets(targets)
        stats = self._rows_forward(zs, zt, zr, local_y)
        present = [m for m, z in enumerate((zs, zt, zr)) if z is not None]
        out, share = self._combine(stats, owner, valid, present)
        # The backward of the same chunk usually follows at once (gradient in forward): keep the slice's share.
        self._last = (targets.data_ptr(), targets.numel(), share)
        return out

    def _slice_loss(self, share, present):
        """L_r = sum over this slice of p(v) c(v), from the re-based expectations `share` [len(present), n]."""
        coef = {0: 1.0, 1: -self.lam, 2: -(1.0 - self.lam)}
        total = torch.zeros_like(share[0])
        for row, m in zip(share, present):
            if coef[m] != 0.0:
                total = total + coef[m] * row
        return total

    def _combine(self, stats, owner, valid, present):
        lse_rows = [(LSE_S, LSE_T, LSE_R)[m] for m in present]
        lp_rows = [(LP_S, LP_T, LP_R)[m] for m in present]
        e_rows = [(E_S, E_T, E_R)[m] for m in present]
        lse_loc = stats[lse_rows]
        top = lse_loc.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all slices -inf: keep exp finite
        # One all-reduce for the sums of exp and the owners' raw target logits.
        raw_target = torch.where(owner, stats[lp_rows] + lse_loc, torch.zeros_like(lse_loc))
        sums = torch.cat([torch.exp(lse_loc - top), raw_target])
        dist.all_reduce(sums, group=self.group)
        k = len(present)
        lse = torch.log(sums[:k]) + top
        lp = sums[k:] - lse
        # Student-weighted expectations: each slice's, re-based to the global log-normaliser and weighted
        # by the student's mass on the slice (0 where the slice has none, never 0 * -inf; a NaN weight stays NaN).
        weight = torch.exp(lse_loc[0] - lse[0])
        share = torch.where(weight != 0, weight * (stats[e_rows] + lse_loc - lse), torch.zeros_like(lse_loc))
        e = share.clone()
        dist.all_reduce(e, group=self.group)
        out = torch.zeros_like(stats)
        keep = valid.to(stats.dtype)
        out[lse_rows] = lse * keep
        out[lp_rows] = lp * keep
        out[e_rows] = e * keep
        return out, self._slice_loss(share * keep, present)

    def backward(self, zs, zt, zr, targets, stats, g_lp, g_loss, out):
        local_y, owner, valid = self._local_targets(targets)
        present = [m for m, z in enumerate((zs, zt, zr)) if z is not None]
        last = getattr(self, "_last", None)
        if last is not None and last[:2] == (targets.data_ptr(), targets.numel()):
            share_loss = last[2]
        else:  # a backward on its own (reduction="none"): this slice's share, from its own statistics
            local = self._rows_forward(zs, zt, zr, local_y)
            share_loss = self._combine(local, owner, valid, present)[1]
        self._last = None
        loss = stats[E_S] - self.lam * stats[E_T] - (1.0 - self.lam) * stats[E_R]
        slice_stats = stats.clone()
        slice_stats[E_S], slice_stats[E_T], slice_stats[E_R] = share_loss, 0.0, 0.0
        g_lp2 = (g_lp + g_loss * (loss - share_loss).to(g_loss.dtype)).contiguous()
        self._rows_backward(zs, zt, zr, local_y, slice_stats, g_lp2, g_loss, out)
        # The kernel added g_lp2 / T_s at local_y (the target, or the stand-in column 0): only the owner's
        # target gets a one-hot term, and it is g_lp / T_s.
        fix = torch.where(valid, torch.where(owner, g_lp, torch.zeros_like(g_lp)) - g_lp2, torch.zeros_like(g_lp))
        column = torch.where(valid, local_y, torch.zeros_like(local_y))
        out.scatter_add_(1, column[:, None], (fix / self.ts).to(out.dtype)[:, None])
        return out

    def reduce_hidden_grad(self, dh):
        if dh is not None:
            dist.all_reduce(dh, group=self.group)
        return dh
