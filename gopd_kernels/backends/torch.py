"""Plain-PyTorch row kernels: the always-available fallback backend.

Processes rows in chunks so the fp32 temporaries stay O(chunk x V) whatever N is. Readable and
exact (float64-capable), never fast. See ``gopd_kernels.backends`` for the contract.
"""

from __future__ import annotations

import torch

from . import E_R, E_S, E_T, LP_R, LP_S, LP_T, LSE_R, LSE_S, LSE_T, NSTATS

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


def _log_probs(z: torch.Tensor, temperature: float, dtype: torch.dtype):
    scaled = z.to(dtype) / temperature
    lse = torch.logsumexp(scaled, dim=-1)
    return scaled - lse[:, None], lse


def _expect(p: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """sum_v p(v) logp(v), where p(v) == 0 contributes 0 (no 0 * -inf); a NaN p stays NaN."""
    return torch.where(p != 0, p * logp, torch.zeros((), dtype=p.dtype, device=p.device)).sum(-1)


def rows_forward(zs, zt, zr, targets, ts, tt, tr, ignore_index):
    n, v = zs.shape
    dtype = _compute_dtype(zs)
    stats = torch.zeros(NSTATS, n, dtype=dtype, device=zs.device)
    valid = targets != ignore_index
    for rows in _chunks(n, v):
        idx = torch.nonzero(valid[rows]).squeeze(1) + rows.start
        if idx.numel() == 0:
            continue
        y = targets[idx][:, None]
        logp_s, lse_s = _log_probs(zs[idx], ts, dtype)
        p_s = logp_s.exp()
        stats[LSE_S, idx] = lse_s
        stats[LP_S, idx] = logp_s.gather(1, y).squeeze(1)
        stats[E_S, idx] = _expect(p_s, logp_s)
        for z, temp, (lse_row, lp_row, e_row) in ((zt, tt, (LSE_T, LP_T, E_T)), (zr, tr, (LSE_R, LP_R, E_R))):
            if z is None:
                continue
            logp, lse = _log_probs(z[idx], temp, dtype)
            stats[lse_row, idx] = lse
            stats[lp_row, idx] = logp.gather(1, y).squeeze(1)
            stats[e_row, idx] = _expect(p_s, logp)
    return stats


def _scaled_term(coef: float, logp: torch.Tensor) -> torch.Tensor:
    """coef * logp with 0 * -inf := 0."""
    if coef == 0:
        return torch.zeros_like(logp)
    return coef * logp


def rows_backward(zs, zt, zr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out):
    n, v = zs.shape
    dtype = _compute_dtype(zs)
    valid = targets != ignore_index
    for rows in _chunks(n, v):
        block = torch.zeros(rows.stop - rows.start, v, dtype=dtype, device=zs.device)
        idx_local = torch.nonzero(valid[rows]).squeeze(1)
        if idx_local.numel() > 0:
            idx = idx_local + rows.start
            logp_s = zs[idx].to(dtype) / ts - stats[LSE_S, idx][:, None].to(dtype)
            p = logp_s.exp()
            grad = -g_lp[idx].to(dtype)[:, None] * p
            grad.scatter_add_(1, targets[idx][:, None], g_lp[idx].to(dtype)[:, None])
            gl = g_loss[idx].to(dtype)
            if bool((gl != 0).any()):
                c = logp_s.clone()
                loss = stats[E_S, idx].to(dtype).clone()
                if zt is not None:
                    c -= _scaled_term(lam, zt[idx].to(dtype) / tt - stats[LSE_T, idx][:, None].to(dtype))
                    loss -= lam * stats[E_T, idx].to(dtype) if lam != 0 else 0
                if zr is not None:
                    c -= _scaled_term(1.0 - lam, zr[idx].to(dtype) / tr - stats[LSE_R, idx][:, None].to(dtype))
                    loss -= (1.0 - lam) * stats[E_R, idx].to(dtype) if lam != 1 else 0
                term = torch.where(p != 0, p * (c - loss[:, None]), torch.zeros((), dtype=dtype, device=zs.device))
                grad += torch.where(gl[:, None] != 0, gl[:, None] * term, torch.zeros((), dtype=dtype, device=zs.device))
            block[idx_local] = grad / ts
        out[rows] = block.to(out.dtype)
    return out
