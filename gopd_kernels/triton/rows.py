"""Triton row kernels for the G-OPD backend contract (see ``gopd_kernels.backends``).

Forward (``rows_forward``): one program per token row makes ONE pass over the vocabulary in
BLOCK_V tiles. With s = z_s / T_s, t = z_t / T_t, r = z_r / T_r (scaled as z * (1 / T), the
reciprocal rounded once) every *lane* of the tile (column j of each tile) keeps its own online state,
so the loop has no block reduction (no barrier) at all; the lanes are merged once after the loop.
Per lane and model x: a running max m_x and rescaled sum S_x = sum exp(x - m_x) (lse_x = m_x + log S_x),
and for the student-weighted expectations, with w = exp(s - m_s),

    A_S = sum w (s - m_s),   A_X = sum w (x - R_x)  (X = T, R),

where R_x is x at the lane's running student argmax. One exp per column and model: exp(-|x - m|) is
the old sums' factor when x is the new max, else x's own weight. When m_s grows to m_s', the w-sums
are multiplied by alpha = exp(m_s - m_s'), A_S first gains S_s (m_s - m_s') and A_X gains
S_s (R_x - R_x') (the references move with the argmax); a model's own max only rescales its S_x. The
lanes merge the same way, into the row's maxima M and references R, and at the end (in fp64)

    lse_x = M_x + log S_x,   log p_x(y) = (x(y) - M_x) - log S_x,
    E_S = A_S / S_s - log S_s,   E_X = A_X / S_s + (R_x - M_x) - log S_x.

Keeping A_X relative to the student's argmax keeps every summand small (no cancellation of two ~1e4
numbers) and makes E_X exact when p_s is (numerically) one-hot (A_X = 0). The statistics are fp64
for every input dtype (the contract allows it): an fp32 lse of magnitude ~1e4 would lose the low
bits of every log-probability the backward recomputes from it.

Non-finite logits: columns with w(v) == 0 (z_s = -inf) contribute 0 to every A (selected with
tl.where, never 0 * -inf); a model that is -inf where the student has weight has A_X = -inf (so
E_X = -inf), and when that weight later underflows (alpha = 0) the -inf goes with it: -inf * 0 is 0
here, never NaN. A reference R_x = -inf (x is -inf at the student's argmax) is not shifted (inf - inf).
A NaN never becomes a running max (x > m is false) and every product that could drop it keeps it
(NaN * 0 = NaN); a +inf logit makes its model's row NaN (inf - inf), as does a row that is -inf
everywhere (log 0 - log 0). Running maxima start at a finite sentinel (-1e30), so an all -inf tile
never produces -inf - -inf = nan.

Backward (``rows_backward``): one pass per row writing

    out(v) = ( g_loss * p(v) (c(v) - L) + g_lp ([v == y] - p(v)) ) / T_s,
    p(v) = exp(s(v) - lse_s),  c(v) - L = d_s(v) - lam d_t(v) - (1 - lam) d_r(v),
    d_x(v) = log p_x(v) - E_X = x(v) - K_x,  K_x = lse_x + E_X,

with lse_s and each K_x split into hi + lo in the accumulation dtype (x - hi) - lo, so no term is a
difference of two large numbers rounded to fp32; z(v) is read before out(v) is written, so ``out``
may alias zs. A row whose gradient is undefined (see ``gopd_kernels.reference``, non-finite inputs)
is NaN in every column. All math is in fp32 (fp64 for fp64 inputs) whatever the input dtype. Shapes:
z* [N, V] with stride(-1) == 1, targets [N] int64, stats [9, N] fp64, g_lp / g_loss [N].
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import tuning
from .._layout import E_R, E_S, E_T, LP_R, LP_S, LP_T, LSE_R, LSE_S, LSE_T, NSTATS

# Finite stand-in for -inf as the initial running max (see module docstring).
_NEG_BIG = tl.constexpr(-1.0e30)
# The stats rows (gopd_kernels._layout) as compile-time constants of the kernels.
_LSE_S, _LSE_T, _LSE_R = tl.constexpr(LSE_S), tl.constexpr(LSE_T), tl.constexpr(LSE_R)
_LP_S, _LP_T, _LP_R = tl.constexpr(LP_S), tl.constexpr(LP_T), tl.constexpr(LP_R)
_E_S, _E_T, _E_R = tl.constexpr(E_S), tl.constexpr(E_T), tl.constexpr(E_R)

# _NO_FMA: both kernels are compiled without multiply-add contraction (enable_fp_fusion=False). With it,
# the compiler turns s - m (s = z * (1 / T) rounded) into fma(z, 1 / T, -m), the unrounded product, so
# at the row's own max s - m is not 0 but the rounding error of s: measured on an H200 (gpu-check,
# 2026-11-28) as E_S = -3.3e-5 instead of 0 at |z / T| ~ 1e4, V = 1, and the forward's lse and the
# backward's p = exp(s - lse) disagreeing by that much. Every difference must use the same rounded s.


@triton.jit
def _lane_step(m, x):
    """One online-max step per lane: (new max, factor of the old sums, weight of x, x is the new max).

    One exp: e = exp(-|x - m|) is the old sums' factor when x is the new max (x's weight is then 1),
    else x's weight (the old sums keep factor 1). A NaN x is never the max: its weight is NaN."""
    d = x - m
    up = d > 0.0
    e = tl.exp(-tl.abs(d))
    return tl.where(up, x, m), tl.where(up, e, 1.0), tl.where(up, 1.0, e), up


@triton.jit
def _scaled(a, f):
    """a * f, except (-inf) * 0 = 0: mass that underflowed away takes its -inf with it (NaN stays NaN)."""
    return tl.where((f == 0.0) & (a == float("-inf")), 0.0, a * f)


@triton.jit
def _moved(A, S_old, R_old, R_new):
    """A_X = sum w (x - R) re-referenced from R_old to R_new (before rescaling): + S_old (R_old - R_new),
    unless a reference is -inf (then E_X is -inf, A_X stays as it is) or there is no weight yet."""
    keep = (S_old == 0.0) | (R_old == R_new) | (R_old == float("-inf")) | (R_new == float("-inf"))
    return tl.where(keep, A, A + S_old * (R_old - R_new))


@triton.jit
def _cross_step(m, S, R, A, x, w, up_s, alpha, S_s_old):
    """Lane update of model x: its own (m, S), its reference R (x at the student's argmax) and A_X."""
    m, beta, u, _up = _lane_step(m, x)
    S = S * beta + u
    R_new = tl.where(up_s, x, R)
    d = tl.where(x == float("-inf"), float("-inf"), tl.where(R_new == float("-inf"), 0.0, x - R_new))
    A = _scaled(_moved(A, S_s_old, R, R_new), alpha) + tl.where(w != 0.0, w * d, 0.0)
    return m, S, R_new, A


@triton.jit
def _merge_cross(m, S, R, A, S_s, f_s, M_s, m_s, ACC: tl.constexpr):
    """Row statistics (lse, E, R - M) of model x from its lanes."""
    M = tl.max(m, axis=0)
    S_tot = tl.sum(S * tl.exp(m - M), axis=0)
    # The row's reference: R at a lane holding the student's max (the largest such R on ties).
    R_row = tl.max(tl.where(m_s == M_s, R, float("-inf")), axis=0)
    # (R_row as a block: the interpreter cannot `|` a block of int1 with a scalar one)
    A_tot = tl.sum(_scaled(_moved(A, S_s, R, R_row + tl.zeros_like(R)), f_s), axis=0)
    return M, S_tot, R_row, A_tot


@triton.jit
def _store_model(out, stride_stat, row_lse, row_lp, row_e, valid, M, S, R, A, S_s_tot, zy):
    """lse = M + log S, log p(y) = (zy - M) - log S, E = A / S_s + (R - M) - log S, all in fp64."""
    log_S = tl.log(tl.where(valid, S, 1.0).to(tl.float64))
    M64 = M.to(tl.float64)
    tl.store(out + row_lse * stride_stat, tl.where(valid, M64 + log_S, 0.0))
    tl.store(out + row_lp * stride_stat, tl.where(valid, (zy.to(tl.float64) - M64) - log_S, 0.0))
    e = A.to(tl.float64) / S_s_tot.to(tl.float64) + (R.to(tl.float64) - M64) - log_S
    tl.store(out + row_e * stride_stat, tl.where(valid, e, 0.0))


@triton.jit
def _rows_forward_kernel(
    zs_ptr, zt_ptr, zr_ptr, y_ptr, stats_ptr,
    V, stride_s, stride_t, stride_r, stride_stat, params_ptr, ignore_index,
    HAS_T: tl.constexpr, HAS_R: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride exceeds 2**31 at N=16k, V=152k
    inv_ts = tl.load(params_ptr + 0).to(ACC)
    inv_tt = tl.load(params_ptr + 1).to(ACC)
    inv_tr = tl.load(params_ptr + 2).to(ACC)
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    # An out-of-range target (not checked on the host for GPU tensors) reads nothing: its log-probs are NaN.
    y_ok = valid & (y >= 0) & (y < V)
    y_safe = tl.where(y_ok, y, 0)
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    zr_row = zr_ptr + row * stride_r
    cols0 = tl.arange(0, BLOCK_V)

    zero = tl.zeros((BLOCK_V,), dtype=ACC)
    m_s = zero + _NEG_BIG
    m_t = zero + _NEG_BIG
    m_r = zero + _NEG_BIG
    S_s = zero
    S_t = zero
    S_r = zero
    A_s = zero
    A_t = zero
    A_r = zero
    R_t = zero
    R_r = zero

    # Masked rows get a zero-trip loop: no vocabulary pass. The loop body is elementwise per lane.
    v_end = tl.where(valid, V, 0)
    for start in range(0, v_end, BLOCK_V):
        cols = start + cols0
        inb = cols < V
        s = tl.load(zs_row + cols, mask=inb, other=float("-inf")).to(ACC) * inv_ts
        m_s_new, alpha, w, up_s = _lane_step(m_s, s)
        S_s_old = S_s
        S_s = S_s * alpha + w
        # A_s relative to m_s_new: old terms lose (m_s_new - m_s) per unit weight, then rescale (never -inf).
        A_s = (A_s - (m_s_new - m_s) * S_s_old) * alpha + tl.where(w != 0.0, w * (s - m_s_new), 0.0)
        if HAS_T:
            t = tl.load(zt_row + cols, mask=inb, other=float("-inf")).to(ACC) * inv_tt
            m_t, S_t, R_t, A_t = _cross_step(m_t, S_t, R_t, A_t, t, w, up_s, alpha, S_s_old)
        if HAS_R:
            r = tl.load(zr_row + cols, mask=inb, other=float("-inf")).to(ACC) * inv_tr
            m_r, S_r, R_r, A_r = _cross_step(m_r, S_r, R_r, A_r, r, w, up_s, alpha, S_s_old)
        m_s = m_s_new

    # Merge the lanes (once per row).
    M_s = tl.max(m_s, axis=0)
    f_s = tl.exp(m_s - M_s)
    S_s_tot = tl.sum(S_s * f_s, axis=0)
    A_s_tot = tl.sum((A_s - (M_s - m_s) * S_s) * f_s, axis=0)
    # Masked rows never ran the loop (S == 0): use 1 so no log(0) / 0 appears before the masking where.
    S_s_tot = tl.where(valid, S_s_tot, 1.0)
    out = stats_ptr + row
    zy_s = tl.where(y_ok, tl.load(zs_row + y_safe).to(ACC) * inv_ts, float("nan"))
    _store_model(out, stride_stat, _LSE_S, _LP_S, _E_S, valid, M_s, S_s_tot, M_s, A_s_tot, S_s_tot, zy_s)
    if HAS_T:
        M_t, S_t_tot, R_t_row, A_t_tot = _merge_cross(m_t, S_t, R_t, A_t, S_s, f_s, M_s, m_s, ACC)
        zy_t = tl.where(y_ok, tl.load(zt_row + y_safe).to(ACC) * inv_tt, float("nan"))
        _store_model(out, stride_stat, _LSE_T, _LP_T, _E_T, valid, M_t, S_t_tot, R_t_row, A_t_tot, S_s_tot, zy_t)
    if HAS_R:
        M_r, S_r_tot, R_r_row, A_r_tot = _merge_cross(m_r, S_r, R_r, A_r, S_s, f_s, M_s, m_s, ACC)
        zy_r = tl.where(y_ok, tl.load(zr_row + y_safe).to(ACC) * inv_tr, float("nan"))
        _store_model(out, stride_stat, _LSE_R, _LP_R, _E_R, valid, M_r, S_r_tot, R_r_row, A_r_tot, S_s_tot, zy_r)


@triton.jit
def _split(x, ACC: tl.constexpr):
    """An fp64 statistic as hi + lo in ACC (lo = 0 for fp64, and for +-inf; NaN stays NaN)."""
    hi = x.to(ACC)
    return hi, tl.where(hi.to(tl.float64) == x, 0.0, x - hi.to(tl.float64)).to(ACC)


@triton.jit
def _not_finite(x):
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def _rows_backward_kernel(
    zs_ptr, zt_ptr, zr_ptr, y_ptr, stats_ptr, glp_ptr, gloss_ptr, out_ptr,
    V, stride_s, stride_t, stride_r, stride_o, stride_stat, params_ptr, ignore_index,
    HAS_T: tl.constexpr, HAS_R: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    inv_ts = tl.load(params_ptr + 0).to(ACC)
    inv_tt = tl.load(params_ptr + 1).to(ACC)
    inv_tr = tl.load(params_ptr + 2).to(ACC)
    lam = tl.load(params_ptr + 3)  # fp64
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    st = stats_ptr + row
    lse_s = tl.load(st + _LSE_S * stride_stat)
    e_s = tl.load(st + _E_S * stride_stat)
    hi_s, lo_s = _split(lse_s, ACC)
    khi_s, klo_s = _split(lse_s + e_s, ACC)  # log p_s(v) - E_S = s(v) - (lse_s + E_S)
    g_lp = tl.where(valid, tl.load(glp_ptr + row).to(ACC), 0.0)
    g_loss = tl.where(valid, tl.load(gloss_ptr + row).to(ACC), 0.0)
    # Coefficients that are 0 drop their model entirely (0 * -inf := 0), as the contract says.
    lam_t = lam
    lam_r = 1.0 - lam
    loss = e_s  # L (fp64), only for the rule on undefined rows
    khi_t = khi_s
    klo_t = klo_s
    khi_r = khi_s
    klo_r = klo_s
    if HAS_T:
        e_t = tl.load(st + _E_T * stride_stat)
        khi_t, klo_t = _split(tl.load(st + _LSE_T * stride_stat) + e_t, ACC)
        loss -= tl.where(lam_t != 0.0, lam_t * e_t, 0.0)
    if HAS_R:
        e_r = tl.load(st + _E_R * stride_stat)
        khi_r, klo_r = _split(tl.load(st + _LSE_R * stride_stat) + e_r, ACC)
        loss -= tl.where(lam_r != 0.0, lam_r * e_r, 0.0)
    c_t = lam_t.to(ACC)
    c_r = lam_r.to(ACC)
    # An undefined row gradient is NaN in every column (the non-finite rule, gopd_kernels.reference).
    bad = _not_finite(g_lp) | _not_finite(g_loss) | ((g_loss != 0.0) & _not_finite(loss)) | _not_finite(lse_s)
    bad = bad & valid
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
        s = tl.load(zs_row + cols, mask=ld, other=0.0).to(ACC) * inv_ts
        p = tl.exp((s - hi_s) - lo_s)
        d = (s - khi_s) - klo_s  # c(v) - L, term by term
        if HAS_T:
            t = tl.load(zt_row + cols, mask=ld, other=0.0).to(ACC) * inv_tt
            d -= tl.where(c_t != 0.0, c_t * ((t - khi_t) - klo_t), 0.0)
        if HAS_R:
            r = tl.load(zr_row + cols, mask=ld, other=0.0).to(ACC) * inv_tr
            d -= tl.where(c_r != 0.0, c_r * ((r - khi_r) - klo_r), 0.0)
        # g_loss == 0 must give 0 even where c(v) - L is +-inf (e.g. lam * log p_t with p_t = 0).
        full = tl.where(p != 0, g_loss * p * d, 0.0)
        full = tl.where(g_loss != 0.0, full, 0.0)
        grad = full + g_lp * (tl.where(cols == y, 1.0, 0.0) - p)
        grad = tl.where(valid, grad * inv_ts, 0.0)
        grad = tl.where(bad, float("nan"), grad)
        tl.store(out_row + cols, grad.to(out_ptr.dtype.element_ty), mask=inb)


def _acc_dtype(dtype: torch.dtype):
    """The accumulation dtype of logits in `dtype` (one of gopd_kernels.backends.triton.DTYPES, which
    the backend checks before calling)."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _block_and_warps(v: int, cap: int):
    """Tile width: whole row up to `cap` columns (power of two); warps so each thread holds ~8-16 values."""
    block = min(triton.next_power_of_2(max(v, 1)), cap)
    warps = 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1
    return block, warps


# The forward keeps eleven [BLOCK_V] lane states live across its loop (three models), so it holds 4
# columns per thread: 1024 columns over 8 warps, 80 registers for bf16 x 3 on sm_90 (8 per thread takes
# 177). These are the defaults, from ptxas' register report; a device in gopd_kernels/tuning.json gets its
# measured tiles instead.
_FWD_BLOCK = 1024
_BWD_BLOCK = 4096


def _forward_warps(block: int) -> int:
    return max(1, min(8, block // 128))


@functools.lru_cache(maxsize=64)
def _params(device, ts, tt, tr, lam):
    # Scalars travel in a tiny fp64 tensor: 1 / T (rounded to the accumulation dtype in the kernel, so
    # logits are scaled by one multiply) and lam. Float kernel arguments would be rounded to fp32, which
    # is not exact enough for the fp64 path (e.g. lam = 0.3). Cached (the kernels only read it) so
    # repeated calls, e.g. per fused-linear chunk, skip the host-to-device copy.
    return torch.tensor([1.0 / ts, 1.0 / tt, 1.0 / tr, lam], dtype=torch.float64, device=device)


def _models(zt, zr):
    return 1 + (zt is not None) + (zr is not None)


def _row_stride(z):
    return 0 if z is None else z.stride(0)


def rows_forward(zs, zt, zr, targets, ts, tt, tr, ignore_index, *, block_v=None):
    """Per-row stats [NSTATS, N] (fp64 for every input dtype); see ``gopd_kernels.backends``.

    block_v (a power of two) overrides the tile width; tests use small tiles to exercise the
    online rescaling across many tiles at small V.
    """
    acc_tl, _acc_torch = _acc_dtype(zs.dtype)
    n, v = zs.shape
    stats = torch.zeros(NSTATS, n, dtype=torch.float64, device=zs.device)
    if n == 0:
        return stats
    tuned = {} if block_v else tuning.tiles("rows_forward", zs.device, zs.dtype, _models(zt, zr), n)
    block = _block_and_warps(v, tuned.get("block_v", block_v or _FWD_BLOCK))[0]
    warps = tuned.get("num_warps", _forward_warps(block))
    _rows_forward_kernel[(n,)](
        zs, zt if zt is not None else zs, zr if zr is not None else zs, targets, stats,
        v, zs.stride(0), _row_stride(zt), _row_stride(zr), stats.stride(0),
        _params(zs.device, float(ts), float(tt), float(tr), 0.0), ignore_index,
        HAS_T=zt is not None, HAS_R=zr is not None, ACC=acc_tl, BLOCK_V=block, num_warps=warps,
        **tuning.stages(tuned), enable_fp_fusion=False,  # see _NO_FMA
    )
    return stats


def rows_backward(zs, zt, zr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out, *,
                  block_v=None):
    """Writes d(sum_i g_loss_i L_i + g_lp_i lp_s_i) / d zs into ``out`` (may be zs) and returns it."""
    acc_tl, _acc_torch = _acc_dtype(zs.dtype)
    n, v = zs.shape
    if n == 0:
        return out
    stats = stats.to(torch.float64)  # no copy for this backend's own (fp64) statistics
    g_lp = g_lp.contiguous()  # read in their own dtype (fp64 from autograd), no cast kernel
    g_loss = g_loss.contiguous()
    tuned = {} if block_v else tuning.tiles("rows_backward", zs.device, zs.dtype, _models(zt, zr), n)
    block, warps = _block_and_warps(v, tuned.get("block_v", block_v or _BWD_BLOCK))
    warps = tuned.get("num_warps", warps)
    _rows_backward_kernel[(n,)](
        zs, zt if zt is not None else zs, zr if zr is not None else zs, targets, stats, g_lp, g_loss, out,
        v, zs.stride(0), _row_stride(zt), _row_stride(zr), out.stride(0), stats.stride(0),
        _params(zs.device, float(ts), float(tt), float(tr), float(lam)), ignore_index,
        HAS_T=zt is not None, HAS_R=zr is not None, ACC=acc_tl, BLOCK_V=block, num_warps=warps,
        **tuning.stages(tuned), enable_fp_fusion=False,  # see _NO_FMA
    )
    return out
