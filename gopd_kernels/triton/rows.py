"""Triton row kernels for the G-OPD backend contract (see ``gopd_kernels.backends``).

Forward (``rows_forward``): one program per token row makes ONE pass over the vocabulary in
BLOCK_V tiles. With s = z_s / T_s, t = z_t / T_t, r = z_r / T_r it keeps, per model, an online
logsumexp (running max m and rescaled sum S = sum_v exp(x(v) - m)), and for the student-weighted
expectations the running sums

    A_S = sum_v w(v) (s(v) - m_s),  A_T = sum_v w(v) (t(v) - m_t),  A_R = sum_v w(v) (r(v) - m_r),
    w(v) = exp(s(v) - m_s),

all kept relative to the *current* running maxima so the summands stay small (no cancellation
of two ~1e4 numbers at the end). When m_s grows to m_s', every w-weighted sum is multiplied by
alpha = exp(m_s - m_s'); when a model's own max m_x grows by d, A_X loses d * S_s (the old
student weight mass). At the end

    lse_x = m_x + log S_x,   log p_x(v) = (x(v) - m_x) - log S_x,
    E_X = sum_v p_s(v) log p_x(v) = A_X / S_s - log S_x.

Columns with w(v) == 0 (z_s = -inf) contribute 0 to every A (selected with tl.where, never
0 * -inf). Running maxima start at a finite sentinel (-1e30), so an all -inf tile never produces
-inf - -inf = nan; the first finite tile then multiplies the empty sums by exp(-huge) = 0.

Backward (``rows_backward``): one pass per row writing

    out(v) = ( g_loss * p(v) (c(v) - L) + g_lp ([v == y] - p(v)) ) / T_s,
    p(v) = exp(s(v) - lse_s),  c(v) = log p_s(v) - lam log p_t(v) - (1 - lam) log p_r(v),
    L = E_S - lam E_T - (1 - lam) E_R,

reading z(v) before writing out(v) so ``out`` may alias zs. All math is in fp32 (fp64 for fp64
inputs) whatever the input dtype. Shapes: z* [N, V] with stride(-1) == 1, targets [N] int64,
stats [9, N], g_lp / g_loss [N].
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backends import NSTATS

# Finite stand-in for -inf as the initial running max (see module docstring).
_NEG_BIG = tl.constexpr(-1.0e30)

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
def _online_update(m, S, tile, valid_cols):
    """New running max and rescaled sum of exp for one model; returns (m_new, S_new, d = m_new - m)."""
    m_new = tl.maximum(m, tl.max(tl.where(valid_cols, tile, float("-inf")), axis=0))
    e = tl.where(valid_cols, tl.exp(tile - m_new), 0.0)
    S_new = S * tl.exp(m - m_new) + tl.sum(e, axis=0)
    return m_new, S_new, m_new - m


@triton.jit
def _rows_forward_kernel(
    zs_ptr, zt_ptr, zr_ptr, y_ptr, stats_ptr,
    V, stride_s, stride_t, stride_r, stride_stat, params_ptr, ignore_index,
    HAS_T: tl.constexpr, HAS_R: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride exceeds 2**31 at N=16k, V=152k
    ts = tl.load(params_ptr + 0)
    tt = tl.load(params_ptr + 1)
    tr = tl.load(params_ptr + 2)
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    y_safe = tl.where(valid, y, 0)
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    zr_row = zr_ptr + row * stride_r
    cols0 = tl.arange(0, BLOCK_V)

    zero = tl.zeros((), dtype=ACC)
    m_s = zero + _NEG_BIG
    m_t = zero + _NEG_BIG
    m_r = zero + _NEG_BIG
    S_s = zero
    S_t = zero
    S_r = zero
    A_s = zero
    A_t = zero
    A_r = zero

    # Masked rows get a zero-trip loop: no vocabulary pass.
    v_end = tl.where(valid, V, 0)
    for start in range(0, v_end, BLOCK_V):
        cols = start + cols0
        inb = cols < V
        s = tl.load(zs_row + cols, mask=inb, other=float("-inf")).to(ACC) / ts
        m_s_new = tl.maximum(m_s, tl.max(s, axis=0))
        alpha = tl.exp(m_s - m_s_new)
        w = tl.where(inb, tl.exp(s - m_s_new), 0.0)
        pos = w != 0  # not w > 0: a NaN w must reach the sums
        S_s_old = S_s
        S_s = S_s * alpha + tl.sum(w, axis=0)
        # A_s relative to m_s_new: old terms lose (m_s_new - m_s) per unit weight, then rescale.
        shift_s = tl.where(S_s_old > 0, (m_s_new - m_s) * S_s_old, 0.0)
        A_s = (A_s - shift_s) * alpha + tl.sum(tl.where(pos, w * (s - m_s_new), 0.0), axis=0)
        if HAS_T:
            t = tl.load(zt_row + cols, mask=inb, other=float("-inf")).to(ACC) / tt
            m_t_new, S_t, d_t = _online_update(m_t, S_t, t, inb)
            shift_t = tl.where(S_s_old > 0, d_t * S_s_old, 0.0)
            A_t = (A_t - shift_t) * alpha + tl.sum(tl.where(pos, w * (t - m_t_new), 0.0), axis=0)
            m_t = m_t_new
        if HAS_R:
            r = tl.load(zr_row + cols, mask=inb, other=float("-inf")).to(ACC) / tr
            m_r_new, S_r, d_r = _online_update(m_r, S_r, r, inb)
            shift_r = tl.where(S_s_old > 0, d_r * S_s_old, 0.0)
            A_r = (A_r - shift_r) * alpha + tl.sum(tl.where(pos, w * (r - m_r_new), 0.0), axis=0)
            m_r = m_r_new
        m_s = m_s_new

    # Masked rows never ran the loop (S == 0): use 1 so no log(0) / 0 appears before the masking where.
    S_s = tl.where(valid, S_s, 1.0)
    S_t = tl.where(valid, S_t, 1.0)
    S_r = tl.where(valid, S_r, 1.0)
    log_S_s = tl.log(S_s)
    lse_s = m_s + log_S_s
    lp_s = (tl.load(zs_row + y_safe).to(ACC) / ts - m_s) - log_S_s
    e_s = A_s / S_s - log_S_s
    out = stats_ptr + row
    tl.store(out + 0 * stride_stat, tl.where(valid, lse_s, 0.0))
    tl.store(out + 3 * stride_stat, tl.where(valid, lp_s, 0.0))
    tl.store(out + 6 * stride_stat, tl.where(valid, e_s, 0.0))
    if HAS_T:
        log_S_t = tl.log(S_t)
        lp_t = (tl.load(zt_row + y_safe).to(ACC) / tt - m_t) - log_S_t
        tl.store(out + 1 * stride_stat, tl.where(valid, m_t + log_S_t, 0.0))
        tl.store(out + 4 * stride_stat, tl.where(valid, lp_t, 0.0))
        tl.store(out + 7 * stride_stat, tl.where(valid, A_t / S_s - log_S_t, 0.0))
    if HAS_R:
        log_S_r = tl.log(S_r)
        lp_r = (tl.load(zr_row + y_safe).to(ACC) / tr - m_r) - log_S_r
        tl.store(out + 2 * stride_stat, tl.where(valid, m_r + log_S_r, 0.0))
        tl.store(out + 5 * stride_stat, tl.where(valid, lp_r, 0.0))
        tl.store(out + 8 * stride_stat, tl.where(valid, A_r / S_s - log_S_r, 0.0))


@triton.jit
def _rows_backward_kernel(
    zs_ptr, zt_ptr, zr_ptr, y_ptr, stats_ptr, glp_ptr, gloss_ptr, out_ptr,
    V, stride_s, stride_t, stride_r, stride_o, stride_stat, params_ptr, ignore_index,
    HAS_T: tl.constexpr, HAS_R: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ts = tl.load(params_ptr + 0)
    tt = tl.load(params_ptr + 1)
    tr = tl.load(params_ptr + 2)
    lam = tl.load(params_ptr + 3)
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    st = stats_ptr + row
    lse_s = tl.load(st + 0 * stride_stat).to(ACC)
    g_lp = tl.where(valid, tl.load(glp_ptr + row).to(ACC), 0.0)
    g_loss = tl.where(valid, tl.load(gloss_ptr + row).to(ACC), 0.0)
    # Coefficients that are 0 drop their term entirely (0 * -inf := 0), as the contract says.
    lam_t = lam
    lam_r = 1.0 - lam
    loss = tl.load(st + 6 * stride_stat).to(ACC)
    lse_t = lse_s
    lse_r = lse_s
    if HAS_T:
        lse_t = tl.load(st + 1 * stride_stat).to(ACC)
        loss -= tl.where(lam_t != 0.0, lam_t * tl.load(st + 7 * stride_stat).to(ACC), 0.0)
    if HAS_R:
        lse_r = tl.load(st + 2 * stride_stat).to(ACC)
        loss -= tl.where(lam_r != 0.0, lam_r * tl.load(st + 8 * stride_stat).to(ACC), 0.0)
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    zr_row = zr_ptr + row * stride_r
    out_row = out_ptr + row * stride_o
    cols0 = tl.arange(0, BLOCK_V)
    v_load = tl.where(valid, V, 0)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        inb = cols < V
        ld = cols < v_load  # masked rows read nothing, write zeros
        logp_s = tl.load(zs_row + cols, mask=ld, other=0.0).to(ACC) / ts - lse_s
        p = tl.exp(logp_s)
        c = logp_s
        if HAS_T:
            logp_t = tl.load(zt_row + cols, mask=ld, other=0.0).to(ACC) / tt - lse_t
            c -= tl.where(lam_t != 0.0, lam_t * logp_t, 0.0)
        if HAS_R:
            logp_r = tl.load(zr_row + cols, mask=ld, other=0.0).to(ACC) / tr - lse_r
            c -= tl.where(lam_r != 0.0, lam_r * logp_r, 0.0)
        # g_loss == 0 must give 0 even where c(v) - L is +-inf (e.g. lam * log p_t with p_t = 0).
        full = tl.where(p != 0, g_loss * p * (c - loss), 0.0)
        full = tl.where(g_loss != 0.0, full, 0.0)
        grad = full + g_lp * (tl.where(cols == y, 1.0, 0.0) - p)
        grad = tl.where(valid, grad / ts, 0.0)
        tl.store(out_row + cols, grad.to(out_ptr.dtype.element_ty), mask=inb)


def _acc_dtype(dtype: torch.dtype):
    if dtype not in _SUPPORTED:
        raise TypeError(f"triton backend: unsupported logits dtype {dtype}; expected one of {_SUPPORTED}")
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _block_and_warps(v: int, cap: int):
    """Tile width: whole row up to `cap` columns (power of two); warps so each thread holds ~8-16 values."""
    block = min(triton.next_power_of_2(max(v, 1)), cap)
    warps = 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1
    return block, warps


@functools.lru_cache(maxsize=64)
def _params(dtype, device, ts, tt, tr, lam):
    # Scalars travel in a tiny tensor of the accumulation dtype: float kernel arguments would be
    # rounded to fp32, which is not exact enough for the fp64 path (e.g. lam = 0.3). Cached (the
    # kernels only read it) so repeated calls, e.g. per fused-linear chunk, skip the host-to-device copy.
    return torch.tensor([ts, tt, tr, lam], dtype=dtype, device=device)


def _row_stride(z):
    return 0 if z is None else z.stride(0)


def rows_forward(zs, zt, zr, targets, ts, tt, tr, ignore_index, *, block_v=None):
    """Per-row stats [NSTATS, N] (fp32, fp64 for fp64 input); see ``gopd_kernels.backends``.

    block_v (a power of two) overrides the tile width; tests use small tiles to exercise the
    online rescaling across many tiles at small V.
    """
    acc_tl, acc_torch = _acc_dtype(zs.dtype)
    n, v = zs.shape
    stats = torch.zeros(NSTATS, n, dtype=acc_torch, device=zs.device)
    if n == 0:
        return stats
    block, warps = _block_and_warps(v, block_v or 4096)
    _rows_forward_kernel[(n,)](
        zs, zt if zt is not None else zs, zr if zr is not None else zs, targets, stats,
        v, zs.stride(0), _row_stride(zt), _row_stride(zr), stats.stride(0),
        _params(acc_torch, zs.device, float(ts), float(tt), float(tr), 0.0), ignore_index,
        HAS_T=zt is not None, HAS_R=zr is not None, ACC=acc_tl, BLOCK_V=block, num_warps=warps,
    )
    return stats


def rows_backward(zs, zt, zr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out, *,
                  block_v=None):
    """Writes d(sum_i g_loss_i L_i + g_lp_i lp_s_i) / d zs into ``out`` (may be zs) and returns it."""
    acc_tl, acc_torch = _acc_dtype(zs.dtype)
    n, v = zs.shape
    if n == 0:
        return out
    stats = stats.to(acc_torch)
    g_lp = g_lp.to(acc_torch).contiguous()
    g_loss = g_loss.to(acc_torch).contiguous()
    block, warps = _block_and_warps(v, block_v or 4096)
    _rows_backward_kernel[(n,)](
        zs, zt if zt is not None else zs, zr if zr is not None else zs, targets, stats, g_lp, g_loss, out,
        v, zs.stride(0), _row_stride(zt), _row_stride(zr), out.stride(0), stats.stride(0),
        _params(acc_torch, zs.device, float(ts), float(tt), float(tr), float(lam)), ignore_index,
        HAS_T=zt is not None, HAS_R=zr is not None, ACC=acc_tl, BLOCK_V=block, num_warps=warps,
    )
    return out
