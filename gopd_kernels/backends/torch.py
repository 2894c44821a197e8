"""Plain-PyTorch row kernels: the always-available fallback backend.

Processes rows in chunks so the fp32 temporaries stay O(chunk x V) whatever N is. Readable and
exact (float64-capable), never fast. See ``gopd_kernels.backends`` for the contract.

Precision at large |z / T| (the Cut-Cross-Entropy concern): the statistics are fp64 for every input
dtype, like the CPU backend's. Each lse is max + log(sum exp(x - max)) combined in fp64, and each
expectation is taken relative to the model's value R at the student's argmax,

    E_k = sum_v p_s(v) (x_k(v) - R) + (R - max_k) - log sum_k    (the last two terms in fp64),

so E_k is exact when p_s is (numerically) one-hot. The backward recomputes, in the input's fp32,
log p_s(v) = (x_s(v) - hi) - lo from lse_s = hi + lo, and c(v) - L as

    c(v) - L = d_s(v) - lam d_t(v) - (1 - lam) d_r(v),  d_k(v) = log p_k(v) - E_k = x_k(v) - (lse_k + E_k),

with each K_k = lse_k + E_k split into hi + lo the same way: no term is ever a difference of two large
numbers rounded to fp32 (an fp32 lse of size 1e4 is only good to ~5e-4; c(v) - L at the argmax of a
one-hot p_s would cancel two numbers of the size of log p_t there).
"""

from __future__ import annotations

import torch

from .._layout import E_R, E_S, E_T, LP_R, LP_S, LP_T, LSE_R, LSE_S, LSE_T, NSTATS

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Rows per chunk are chosen so one fp32 [rows, V] temporary stays near this many elements.
_CHUNK_ELEMENTS = 1 << 22


def available():
    return True, ""


def _compute_dtype(z: torch.Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _chunks(n: int, v: int):
    step = max(1, _CHUNK_ELEMENTS // max(v, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _moments(z: torch.Tensor, temperature: float, dtype: torch.dtype):
    """(x = z / T [rows, V], shift m [rows, 1], log_s [rows, 1]) in dtype, with
    lse = m + log_s and log p = (x - m) - log_s. A row with a NaN or a +inf gets m = NaN, so it is NaN
    throughout (a +inf logit is not a distribution; torch.log_softmax agrees); a row that is -inf
    everywhere shifts by 0 (as torch.logsumexp does): lse = -inf, log p = NaN."""
    x = z.to(dtype) / temperature
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros((), dtype=dtype, device=z.device), m)
    m = torch.where(m == float("inf"), torch.full((), float("nan"), dtype=dtype, device=z.device), m)
    log_s = torch.log(torch.exp(x - m).sum(dim=-1, keepdim=True))
    return x, m, log_s


def _expect(p_s, x, m, log_s, at_argmax):
    """E = sum_v p_s(v) log p(v) [rows] in fp64, relative to R = x at the student's argmax (see the module
    docstring); a column with p_s(v) == 0 contributes 0 (no 0 * -inf), a NaN p_s stays NaN."""
    r = x.gather(1, at_argmax)
    r = torch.where(r == float("-inf"), m, r)  # any R is exact algebra; -inf would make inf - inf
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    rel = torch.where(p_s != 0, p_s * (x - r), zero).sum(-1)
    return rel.double() + ((r - m).double() - log_s.double()).squeeze(1)


def _split(x: torch.Tensor, dtype: torch.dtype):
    """An fp64 statistic [rows] as hi + lo in dtype, each [rows, 1] (lo = 0 for fp64 and for +-inf)."""
    hi = x.to(dtype)
    lo = torch.where(hi.double() == x, torch.zeros((), dtype=torch.float64, device=x.device),
                     x - hi.double()).to(dtype)
    return hi[:, None], lo[:, None]


def rows_forward(zs, zt, zr, targets, ts, tt, tr, ignore_index):
    n, v = zs.shape
    dtype = _compute_dtype(zs)
    stats = torch.zeros(NSTATS, n, dtype=torch.float64, device=zs.device)
    valid = targets != ignore_index
    for rows in _chunks(n, v):
        idx = torch.nonzero(valid[rows]).squeeze(1) + rows.start
        if idx.numel() == 0:
            continue
        y = targets[idx][:, None]
        # An out-of-range target (not checked on the host for GPU tensors) gets NaN log-probs, no stray read.
        y_ok = (y >= 0) & (y < v)
        y = y.clamp(0, max(v - 1, 0))
        x_s, m_s, log_s_s = _moments(zs[idx], ts, dtype)
        p_s = torch.exp((x_s - m_s) - log_s_s)
        at_argmax = x_s.argmax(dim=-1, keepdim=True)
        for z, x, m, log_s, (lse_row, lp_row, e_row) in (
                (zs, x_s, m_s, log_s_s, (LSE_S, LP_S, E_S)),
                (zt, None, None, None, (LSE_T, LP_T, E_T)),
                (zr, None, None, None, (LSE_R, LP_R, E_R))):
            if z is None:
                continue
            if x is None:
                x, m, log_s = _moments(z[idx], tt if lse_row == LSE_T else tr, dtype)
            stats[lse_row, idx] = (m.double() + log_s.double()).squeeze(1)
            lp = (x.gather(1, y).double() - m.double()) - log_s.double()
            stats[lp_row, idx] = torch.where(y_ok, lp, torch.full((), float("nan"), dtype=torch.float64,
                                                                   device=lp.device)).squeeze(1)
            stats[e_row, idx] = _expect(p_s, x, m, log_s, at_argmax)
    return stats


def _not_finite(x: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(x)


def rows_backward(zs, zt, zr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out):
    n, v = zs.shape
    dtype = _compute_dtype(zs)
    valid = targets != ignore_index
    stats = stats.to(torch.float64)
    nan = torch.full((), float("nan"), dtype=dtype, device=zs.device)
    zero = torch.zeros((), dtype=dtype, device=zs.device)
    for rows in _chunks(n, v):
        block = torch.zeros(rows.stop - rows.start, v, dtype=dtype, device=zs.device)
        idx_local = torch.nonzero(valid[rows]).squeeze(1)
        if idx_local.numel() > 0:
            idx = idx_local + rows.start
            x_s = zs[idx].to(dtype) / ts
            hi, lo = _split(stats[LSE_S, idx], dtype)
            p = torch.exp((x_s - hi) - lo)
            glp = g_lp[idx].to(dtype)
            grad = -glp[:, None] * p
            y = targets[idx][:, None]
            y_ok = (y >= 0) & (y < v)  # an out-of-range target matches no column
            grad.scatter_add_(1, y.clamp(0, max(v - 1, 0)), torch.where(y_ok, glp[:, None], zero))
            gl = g_loss[idx].to(dtype)
            # c(v) - L = sum_k coef_k (x_k(v) - K_k), K_k = lse_k + E_k; a zero coefficient drops its model.
            hi, lo = _split(stats[LSE_S, idx] + stats[E_S, idx], dtype)
            diff = (x_s - hi) - lo
            loss = stats[E_S, idx].clone()  # L, for the rule below
            for z, temp, coef, lse_row, e_row in ((zt, tt, lam, LSE_T, E_T), (zr, tr, 1.0 - lam, LSE_R, E_R)):
                if z is None or coef == 0:
                    continue
                hi, lo = _split(stats[lse_row, idx] + stats[e_row, idx], dtype)
                diff -= coef * ((z[idx].to(dtype) / temp - hi) - lo)
                loss -= coef * stats[e_row, idx]
            term = torch.where(p != 0, p * diff, zero)
            grad += torch.where(gl[:, None] != 0, gl[:, None] * term, zero)
            # An undefined row gradient is NaN in every column (the non-finite rule, gopd_kernels.reference).
            bad = (_not_finite(glp) | _not_finite(gl) | ((gl != 0) & _not_finite(loss))
                   | _not_finite(stats[LSE_S, idx]))
            block[idx_local] = torch.where(bad[:, None], nan, grad / ts)
        out[rows] = block.to(out.dtype)
    return out
