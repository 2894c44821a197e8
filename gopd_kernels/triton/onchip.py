"""Fused-linear G-OPD kernels that keep the logits on chip (``backend="triton_onchip"``).

The chunked fused-linear path (``gopd_kernels.autograd``) writes each chunk's [chunk, V] fp32 logits to
global memory with a GEMM and reads them back in the row kernels. Here the logit tiles are formed by
``tl.dot`` from H and W tiles and consumed where they are made, as Cut-Cross-Entropy does for one head:
no [N, V] or [chunk, V] tensor exists anywhere.

Forward (``onchip_forward``): one program per block of BLOCK_N tokens walks the vocabulary in BLOCK_V
tiles. For each tile and head m (student s, teacher t, reference r, each with its own hidden size D_m)
the logit tile Z_m = H_m[rows] W_m[cols]^T is accumulated over D_m in BLOCK_D steps (fp32, fp64 for
fp64 input), scaled by 1 / T_m (the reciprocal rounded once, as in rows.py) and folded into per-row
online statistics held in registers: a running max m_x and rescaled sum S_x per model, and the
student-weighted sums of rows.py (its docstring has the derivation), with w = exp(s - m_s),

    A_S = sum w (s - m_s),   A_X = sum w (x - R_x)   (X = T, R),

R_x = x at the student's running argmax. When a tile raises m_s to m_s' the old sums are rescaled by
alpha = exp(m_s - m_s'), A_S first gains S_s (m_s - m_s') and A_X gains S_s (R_x - R_x'). The tile's
columns are reduced at once (rows.py keeps one state per lane instead because it has no row block).
At the end, in fp64: lse_x = m_x + log S_x, log p_x(y) = (x(y) - m_x) - log S_x,
E_S = A_S / S_s - log S_s, E_X = A_X / S_s + (R_x - m_x) - log S_x. Output: the [9, N] fp64
statistics of the row contract (``gopd_kernels.backends``) and the scaled target logits x(y) [3, N].

Backward (``onchip_backward``): one program per BLOCK_V columns of the vocabulary; it walks all token
blocks, recomputes the student's logit tile (and the teacher's / reference's only where the full-mode
term is needed), forms the logit gradient of rows.py's backward

    dz(v) = ( g_loss p(v) (c(v) - L) + g_lp ([v == y] - p(v)) ) / T_s,
    p(v) = exp((s - hi_s) - lo_s),  c(v) - L = d_s(v) - lam d_t(v) - (1 - lam) d_r(v),  d_x = (x - Khi_x) - Klo_x,

with K_x = lse_x + E_X split hi + lo, and adds dz^T H_s into its own rows of dW_s and dz W_s into dH_s.
dW: the program owns its BLOCK_V rows of dW, so it accumulates them by plain load-add-store with no
atomics and a fixed order (deterministic). dH: every vocabulary block adds into every token's row, so
those adds are fp32 (fp64) atomics. The alternative, a partial dH per vocabulary block and a reduction,
needs [V / BLOCK_V, N, D] floats (~100 GB at N = 8192, V = 151936, D = 2560): not an option. Atomics
make dH's low bits depend on the order the blocks finish in (not bit-reproducible run to run).
The teacher and reference get no gradient. Which of this is faster than the chunked path is NOT
MEASURED (no GPU run yet): ``backend="auto"`` never picks this backend.

Shapes: hidden [N, D_m] and weight [>= V, D_m] with any strides (a padded teacher / reference
vocabulary is cut to the student's V by reading rows < V only), targets [N] int64. Non-finite hidden
states or weights follow IEEE arithmetic but are not held to the reference's non-finite rules (the
chunked backends are); masked tokens (target == ignore_index) get zero statistics and gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import tuning
from .._layout import NSTATS
from .rows import _E_R, _E_S, _E_T, _LP_R, _LP_S, _LP_T, _LSE_R, _LSE_S, _LSE_T, _not_finite, _split

_NEG_BIG = tl.constexpr(-1.0e30)  # finite initial running max (as rows.py): no -inf - -inf

# Default tile sizes: chosen so the forward's three [BLOCK_N, BLOCK_V] fp32 accumulators plus the tile of
# each operand fit the registers of one program, not measured; a device in gopd_kernels/tuning.json gets
# its measured tiles instead, and an explicit `blocks` argument wins over both. Tests pass smaller blocks to
# cross many tiles at small shapes. tl.dot needs every dimension >= 16.
BLOCKS = dict(block_n=64, block_v=128, block_d=64)
_WARPS = 8


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, inv_t,
                ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_F32: tl.constexpr):
    """(H[rows] W[cols]^T) * (1 / T) as a [BLOCK_N, BLOCK_V] tile in ACC; rows >= N / cols >= V read 0."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC)
    dk = tl.arange(0, BLOCK_D)
    rmask = rows[:, None] < N
    cmask = cols[:, None] < V
    for k in range(0, D, BLOCK_D):
        kk = k + dk
        kmask = kk[None, :] < D
        h = tl.load(h_ptr + rows[:, None] * stride_hn + kk[None, :] * stride_hd, mask=rmask & kmask, other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wv + kk[None, :] * stride_wd, mask=cmask & kmask, other=0.0)
        if DOT_F32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if h.dtype == tl.float32:
            # Exact fp32 products: tf32 (Triton's default for fp32) would keep 10 mantissa bits.
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    return acc * inv_t


@triton.jit
def _cross_update(m, S, R, A, zy, x, s, tile_max_s, w, up_s, alpha, S_s_old, is_y):
    """One tile of model x: its own (m, S), its reference R (x at the student's argmax), A_X and x(y)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    S = S * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
    # x where the student reaches its tile max (the largest such x on ties): the new reference if the
    # student's running max moved into this tile.
    x_at = tl.max(tl.where(s == tile_max_s[:, None], x, float("-inf")), axis=1)
    R_new = tl.where(up_s, x_at, R)
    A = (A + S_s_old * (R - R_new)) * alpha + tl.sum(tl.where(w != 0.0, w * (x - R_new[:, None]), 0.0), axis=1)
    zy += tl.sum(tl.where(is_y, x, 0.0), axis=1)
    return m_new, S, R_new, A, zy


@triton.jit
def _store_model(stats_ptr, zy_ptr, rows, out_mask, valid, stride_stat, N, row_lse, row_lp, row_e, slot,
                 M, S, R, A, S_s, zy, y_ok):
    """lse = M + log S, log p(y) = (zy - M) - log S, E = A / S_s + (R - M) - log S, all in fp64."""
    log_S = tl.log(tl.where(valid, S, 1.0).to(tl.float64))
    M64 = M.to(tl.float64)
    zy = tl.where(y_ok, zy, float("nan"))
    e = A.to(tl.float64) / tl.where(valid, S_s, 1.0).to(tl.float64) + (R.to(tl.float64) - M64) - log_S
    tl.store(stats_ptr + row_lse * stride_stat + rows, tl.where(valid, M64 + log_S, 0.0), mask=out_mask)
    tl.store(stats_ptr + row_lp * stride_stat + rows, tl.where(valid, (zy.to(tl.float64) - M64) - log_S, 0.0),
             mask=out_mask)
    tl.store(stats_ptr + row_e * stride_stat + rows, tl.where(valid, e, 0.0), mask=out_mask)
    tl.store(zy_ptr + slot * N + rows, tl.where(valid, zy, 0.0), mask=out_mask)


@triton.jit
def _onchip_forward_kernel(
    hs_ptr, ws_ptr, ht_ptr, wt_ptr, hr_ptr, wr_ptr, y_ptr, stats_ptr, zy_ptr,
    N, V, D_s, D_t, D_r,
    s_hn, s_hd, s_wv, s_wd, t_hn, t_hd, t_wv, t_wd, r_hn, r_hd, r_wv, r_wd,
    stride_stat, params_ptr, ignore_index,
    HAS_T: tl.constexpr, HAS_R: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = rows < N
    y = tl.load(y_ptr + rows, mask=out_mask, other=ignore_index)
    valid = out_mask & (y != ignore_index)
    # An out-of-range target (not checked on the host for GPU tensors) matches no column: NaN log-probs.
    y_ok = valid & (y >= 0) & (y < V)
    inv_ts = tl.load(params_ptr + 0).to(ACC)
    inv_tt = tl.load(params_ptr + 1).to(ACC)
    inv_tr = tl.load(params_ptr + 2).to(ACC)

    zero = tl.zeros((BLOCK_N,), dtype=ACC)
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
    zy_s = zero
    zy_t = zero
    zy_r = zero
    # All rows of the block walk the vocabulary (masked rows included: the tile is shared); their
    # statistics are replaced by 0 at the end.
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inb = (cols < V)[None, :]
        is_y = cols[None, :] == y[:, None]
        s = _logit_tile(hs_ptr, ws_ptr, rows, cols, N, V, D_s, s_hn, s_hd, s_wv, s_wd, inv_ts,
                        ACC, BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32)
        s = tl.where(inb, s, float("-inf"))
        tile_max = tl.max(s, axis=1)
        m_s_new = tl.maximum(m_s, tile_max)
        up_s = tile_max > m_s
        alpha = tl.exp(m_s - m_s_new)
        w = tl.exp(s - m_s_new[:, None])
        S_s_old = S_s
        S_s = S_s * alpha + tl.sum(w, axis=1)
        # A_s relative to the new max: the old terms lose (m_s_new - m_s) per unit weight, then rescale.
        A_s = (A_s - (m_s_new - m_s) * S_s_old) * alpha + tl.sum(tl.where(w != 0.0, w * (s - m_s_new[:, None]), 0.0),
                                                                axis=1)
        zy_s += tl.sum(tl.where(is_y, s, 0.0), axis=1)
        if HAS_T:
            t = _logit_tile(ht_ptr, wt_ptr, rows, cols, N, V, D_t, t_hn, t_hd, t_wv, t_wd, inv_tt,
                            ACC, BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32)
            t = tl.where(inb, t, float("-inf"))
            m_t, S_t, R_t, A_t, zy_t = _cross_update(m_t, S_t, R_t, A_t, zy_t, t, s, tile_max, w, up_s, alpha,
                                                     S_s_old, is_y)
        if HAS_R:
            r = _logit_tile(hr_ptr, wr_ptr, rows, cols, N, V, D_r, r_hn, r_hd, r_wv, r_wd, inv_tr,
                            ACC, BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32)
            r = tl.where(inb, r, float("-inf"))
            m_r, S_r, R_r, A_r, zy_r = _cross_update(m_r, S_r, R_r, A_r, zy_r, r, s, tile_max, w, up_s, alpha,
                                                     S_s_old, is_y)
        m_s = m_s_new

    _store_model(stats_ptr, zy_ptr, rows, out_mask, valid, stride_stat, N, _LSE_S, _LP_S, _E_S, 0,
                 m_s, S_s, m_s, A_s, S_s, zy_s, y_ok)
    if HAS_T:
        _store_model(stats_ptr, zy_ptr, rows, out_mask, valid, stride_stat, N, _LSE_T, _LP_T, _E_T, 1,
                     m_t, S_t, R_t, A_t, S_s, zy_t, y_ok)
    if HAS_R:
        _store_model(stats_ptr, zy_ptr, rows, out_mask, valid, stride_stat, N, _LSE_R, _LP_R, _E_R, 2,
                     m_r, S_r, R_r, A_r, S_s, zy_r, y_ok)


@triton.jit
def _onchip_backward_kernel(
    hs_ptr, ws_ptr, ht_ptr, wt_ptr, hr_ptr, wr_ptr, y_ptr, stats_ptr, glp_ptr, gloss_ptr, dh_ptr, dw_ptr,
    N, V, D_s, D_t, D_r,
    s_hn, s_hd, s_wv, s_wd, t_hn, t_hd, t_wv, t_wd, r_hn, r_hd, r_wv, r_wd,
    stride_stat, stride_dhn, stride_dwv, params_ptr, ignore_index,
    USE_T: tl.constexpr, USE_R: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < V
    inv_ts = tl.load(params_ptr + 0).to(ACC)
    inv_tt = tl.load(params_ptr + 1).to(ACC)
    inv_tr = tl.load(params_ptr + 2).to(ACC)
    lam = tl.load(params_ptr + 3)  # fp64
    c_t = lam.to(ACC)
    c_r = (1.0 - lam).to(ACC)
    dk = tl.arange(0, BLOCK_D)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        y = tl.load(y_ptr + rows, mask=rmask, other=ignore_index)
        valid = rmask & (y != ignore_index)
        lse_s = tl.load(stats_ptr + _LSE_S * stride_stat + rows, mask=valid, other=0.0)
        e_s = tl.load(stats_ptr + _E_S * stride_stat + rows, mask=valid, other=0.0)
        hi_s, lo_s = _split(lse_s, ACC)
        khi_s, klo_s = _split(lse_s + e_s, ACC)
        g_lp = tl.load(glp_ptr + rows, mask=valid, other=0.0).to(ACC)
        g_loss = tl.load(gloss_ptr + rows, mask=valid, other=0.0).to(ACC)
        loss = e_s  # L (fp64), only for the rule on undefined rows
        s = _logit_tile(hs_ptr, ws_ptr, rows, cols, N, V, D_s, s_hn, s_hd, s_wv, s_wd, inv_ts,
                        ACC, BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32)
        p = tl.exp((s - hi_s[:, None]) - lo_s[:, None])
        d = (s - khi_s[:, None]) - klo_s[:, None]  # c(v) - L, term by term
        if USE_T:
            e_t = tl.load(stats_ptr + _E_T * stride_stat + rows, mask=valid, other=0.0)
            khi_t, klo_t = _split(tl.load(stats_ptr + _LSE_T * stride_stat + rows, mask=valid, other=0.0) + e_t, ACC)
            loss -= lam * e_t
            t = _logit_tile(ht_ptr, wt_ptr, rows, cols, N, V, D_t, t_hn, t_hd, t_wv, t_wd, inv_tt,
                            ACC, BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32)
            d -= c_t * ((t - khi_t[:, None]) - klo_t[:, None])
        if USE_R:
            e_r = tl.load(stats_ptr + _E_R * stride_stat + rows, mask=valid, other=0.0)
            khi_r, klo_r = _split(tl.load(stats_ptr + _LSE_R * stride_stat + rows, mask=valid, other=0.0) + e_r, ACC)
            loss -= (1.0 - lam) * e_r
            r = _logit_tile(hr_ptr, wr_ptr, rows, cols, N, V, D_r, r_hn, r_hd, r_wv, r_wd, inv_tr,
                            ACC, BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32)
            d -= c_r * ((r - khi_r[:, None]) - klo_r[:, None])
        bad = _not_finite(g_lp) | _not_finite(g_loss) | ((g_loss != 0.0) & _not_finite(loss)) | _not_finite(lse_s)
        bad = bad & valid
        # g_loss == 0 (or p == 0) gives 0 even where c(v) - L is +-inf.
        full = tl.where((p != 0.0) & (g_loss[:, None] != 0.0), g_loss[:, None] * p * d, 0.0)
        onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
        dz = (full + g_lp[:, None] * (onehot - p)) * inv_ts
        keep = valid[:, None] & cmask[None, :]
        dz = tl.where(keep, dz, 0.0)
        dz = tl.where(bad[:, None] & cmask[None, :], float("nan"), dz)
        for k in range(0, D_s, BLOCK_D):
            kk = k + dk
            kmask = kk[None, :] < D_s
            h = tl.load(hs_ptr + rows[:, None] * s_hn + kk[None, :] * s_hd, mask=rmask[:, None] & kmask, other=0.0)
            w = tl.load(ws_ptr + cols[:, None] * s_wv + kk[None, :] * s_wd, mask=cmask[:, None] & kmask, other=0.0)
            # 16-bit heads: dz is rounded to the input dtype once, as the chunked path does, so these
            # products run on tensor cores with fp32 accumulation.
            dzc = dz.to(h.dtype)
            if DOT_F32:  # exact up-casts: the same products, the same fp32 accumulation
                dzc = dzc.to(tl.float32)
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            if h.dtype == tl.float32:
                dw_part = tl.dot(tl.trans(dzc), h, input_precision="ieee", out_dtype=ACC)
                dh_part = tl.dot(dzc, w, input_precision="ieee", out_dtype=ACC)
            else:
                dw_part = tl.dot(tl.trans(dzc), h, out_dtype=ACC)
                dh_part = tl.dot(dzc, w, out_dtype=ACC)
            dw_ptrs = dw_ptr + cols[:, None] * stride_dwv + kk[None, :]
            dw_mask = cmask[:, None] & kmask
            # This program owns these dW rows: a plain read-add-write in a fixed order (no atomics).
            tl.store(dw_ptrs, tl.load(dw_ptrs, mask=dw_mask, other=0.0) + dw_part, mask=dw_mask)
            tl.atomic_add(dh_ptr + rows[:, None] * stride_dhn + kk[None, :], dh_part, mask=rmask[:, None] & kmask)


def _dot_f32(hs):
    """Whether to up-cast 16-bit tiles to fp32 before tl.dot: for bf16 under Triton's interpreter (CPU
    tensors), whose dot multiplies bf16's raw bit patterns as integers (numpy has no bf16). bf16 -> fp32 is
    exact, so the products and their fp32 accumulation are the tensor cores'."""
    return hs.device.type == "cpu" and hs.dtype == torch.bfloat16


def _acc(dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _head_args(h, w, like):
    """(hidden, weight, D, 4 strides) of a head; an absent head stands in with the student's pointers."""
    if h is None:
        h, w = like
        return h, w, 0, 0, 0, 0, 0
    return h, w, h.shape[1], h.stride(0), h.stride(1), w.stride(0), w.stride(1)


def _params(device, ts, tt, tr, lam):
    # fp64 scalars as in rows.py: a float kernel argument would be rounded to fp32 (lam = 0.3 inexact).
    return torch.tensor([1.0 / ts, 1.0 / tt, 1.0 / tr, lam], dtype=torch.float64, device=device)


def _check_heads(heads):
    for name, (h, w) in heads.items():
        if h is None:
            continue
        if h.dtype != w.dtype:
            raise TypeError(f"triton_onchip: {name} hidden ({h.dtype}) and weight ({w.dtype}) must share a dtype "
                            "(tl.dot takes one); up-cast them first")
        if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
            raise ValueError(f"triton_onchip: {name} expects hidden [N, D] and weight [V, D], got "
                             f"{tuple(h.shape)} and {tuple(w.shape)}")


def onchip_forward(hs, ws, ht, wt, hr, wr, targets, ts, tt, tr, ignore_index, *, vocab=None, blocks=None):
    """(stats [NSTATS, N] fp64, target logits [3, N] in the accumulation dtype, scaled by 1 / T).

    hs [N, D_s], ws [>= V, D_s]; ht / wt and hr / wr likewise with their own D, or None. Each head's
    hidden and weight share a dtype (fp16, bf16, fp32 or fp64); the accumulation dtype is fp64 if the
    student's is, else fp32 (callers up-cast every head to fp64 when any input is fp64). V = vocab
    (default ws.shape[0]). Statistics as ``gopd_kernels.backends`` rows_forward; a model that is None
    has 0 statistics."""
    _check_heads(dict(student=(hs, ws), teacher=(ht, wt), reference=(hr, wr)))
    acc_tl, acc_torch = _acc(hs.dtype)
    n = hs.shape[0]
    v = ws.shape[0] if vocab is None else vocab
    models = 1 + (ht is not None) + (hr is not None)
    b = {**BLOCKS, "num_warps": _WARPS, **(blocks or tuning.tiles("onchip_forward", hs.device, hs.dtype, models, n))}
    stats = torch.zeros(NSTATS, n, dtype=torch.float64, device=hs.device)
    zy = torch.zeros(3, n, dtype=acc_torch, device=hs.device)
    if n == 0:
        return stats, zy
    s_args = _head_args(hs, ws, None)
    t_args = _head_args(ht, wt, (hs, ws))
    r_args = _head_args(hr, wr, (hs, ws))
    grid = (triton.cdiv(n, b["block_n"]),)
    _onchip_forward_kernel[grid](
        s_args[0], s_args[1], t_args[0], t_args[1], r_args[0], r_args[1], targets, stats, zy,
        n, v, s_args[2], t_args[2], r_args[2], *s_args[3:], *t_args[3:], *r_args[3:],
        stats.stride(0), _params(hs.device, ts, tt, tr, 0.0), ignore_index,
        HAS_T=ht is not None, HAS_R=hr is not None, ACC=acc_tl,
        BLOCK_N=b["block_n"], BLOCK_V=b["block_v"], BLOCK_D=b["block_d"], DOT_F32=_dot_f32(hs),
        num_warps=b["num_warps"], **tuning.stages(b),
        enable_fp_fusion=False,  # see rows.py's _NO_FMA: differences of scaled logits must use one rounding
    )
    return stats, zy


def onchip_backward(hs, ws, ht, wt, hr, wr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, *,
                    vocab=None, need_full=True, blocks=None):
    """(dH_s [N, D_s], dW_s [ws.shape[0], D_s]) in the accumulation dtype, for the upstream gradients
    g_lp (of lp_s) and g_loss (of L = E_S - lam E_T - (1 - lam) E_R), both [N].

    need_full=False says g_loss is 0 everywhere (sampled mode): the teacher's and reference's tiles are
    then not recomputed. A model whose coefficient is 0 (lam = 0: teacher; lam = 1: reference) is not
    read. Rows of a padded ws beyond V get 0."""
    _check_heads(dict(student=(hs, ws), teacher=(ht, wt), reference=(hr, wr)))
    acc_tl, acc_torch = _acc(hs.dtype)
    n = hs.shape[0]
    v = ws.shape[0] if vocab is None else vocab
    lam = float(lam)
    use_t, use_r = need_full and ht is not None and lam != 0.0, need_full and hr is not None and lam != 1.0
    b = {**BLOCKS, "num_warps": _WARPS,
         **(blocks or tuning.tiles("onchip_backward", hs.device, hs.dtype, 1 + use_t + use_r, n))}
    dh = torch.zeros(hs.shape, dtype=acc_torch, device=hs.device)
    dw = torch.zeros(ws.shape, dtype=acc_torch, device=hs.device)
    if n == 0:
        return dh, dw
    s_args = _head_args(hs, ws, None)
    t_args = _head_args(ht, wt, (hs, ws))
    r_args = _head_args(hr, wr, (hs, ws))
    grid = (triton.cdiv(v, b["block_v"]),)
    _onchip_backward_kernel[grid](
        s_args[0], s_args[1], t_args[0], t_args[1], r_args[0], r_args[1], targets, stats.to(torch.float64),
        g_lp.contiguous(), g_loss.contiguous(), dh, dw,
        n, v, s_args[2], t_args[2], r_args[2], *s_args[3:], *t_args[3:], *r_args[3:],
        stats.stride(0), dh.stride(0), dw.stride(0), _params(hs.device, ts, tt, tr, lam), ignore_index,
        USE_T=use_t, USE_R=use_r,
        ACC=acc_tl, BLOCK_N=b["block_n"], BLOCK_V=b["block_v"], BLOCK_D=b["block_d"], DOT_F32=_dot_f32(hs),
        num_warps=b["num_warps"], **tuning.stages(b),
        enable_fp_fusion=False,  # see rows.py's _NO_FMA
    )
    return dh, dw
