"""The C++ CPU backend (csrc/cpu/) against the plain-torch backend and the reference.

Row-kernel level: rows_forward / rows_backward of ``gopd_kernels.backends.cpu`` against
``gopd_kernels.backends.torch`` (the contract's oracle) in float64 (tight), and in float32 / bfloat16 /
float16 judged against plain torch's own error in that dtype vs a float64 oracle on the same rounded
inputs. Then in-place backward, thread-count independence, input errors, and end to end through
``gopd_kernels.gopd_loss(backend="cpu")`` / ``fused_linear_gopd_loss`` against ``gopd_kernels.reference``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gopd_kernels.backends import cpu
from gopd_kernels.backends import torch as tb

from helpers import assert_close_as_torch, make_problem, max_err, missing

_ok, _why = cpu.available()
if not _ok:
    missing(f"the C++ cpu backend ({_why})")

IGN = -100


def _models(zs, zt, zr, which):
    """Drop teacher and/or reference as the case asks (zr None only with lam == 1 per the contract)."""
    return zs, (None if which in ("no_t", "none") else zt), (None if which in ("no_r", "none") else zr)


def _grads(n, dtype, seed, zero_frac=0.3):
    g = torch.Generator().manual_seed(seed + 1)
    g_lp = torch.randn(n, generator=g, dtype=torch.float64)
    g_loss = torch.randn(n, generator=g, dtype=torch.float64)
    g_loss[torch.rand(n, generator=g) < zero_frac] = 0.0  # a zero coefficient must drop its term
    return g_lp.to(dtype), g_loss.to(dtype)


def _slice_pad(z, v, pad):
    """A [N, V] column slice of a [N, V + pad] tensor: stride(0) != V, stride(-1) == 1."""
    if pad == 0 or z is None:
        return z
    wide = torch.full((z.shape[0], v + pad), 7.0, dtype=z.dtype)
    wide[:, :v] = z
    return wide[:, :v]


def _both(zs, zt, zr, y, temps, lam, g_lp, g_loss):
    ts, tt, tr = temps
    a = cpu.rows_forward(zs, zt, zr, y, ts, tt, tr, IGN)
    b = tb.rows_forward(zs, zt, zr, y, ts, tt, tr, IGN)
    oa = cpu.rows_backward(zs, zt, zr, y, a, g_lp, g_loss, lam, ts, tt, tr, IGN, torch.empty_like(zs))
    ob = tb.rows_backward(zs, zt, zr, y, b, g_lp, g_loss, lam, ts, tt, tr, IGN, torch.empty_like(zs))
    return a, b, oa, ob


@given(n=st.sampled_from([1, 7, 33]), v=st.sampled_from([1, 7, 129, 1025, 3001]),
       lam=st.sampled_from([0.0, 0.5, 1.0, 1.25, 3.0]), scale=st.sampled_from([1.0, 30.0, 1e4]),
       inf_cols=st.sampled_from([0, 3]), pad=st.sampled_from([0, 5]),
       temps=st.sampled_from([(1.0, 1.0, 1.0), (0.7, 1.0, 1.5), (2.0, 0.5, 1.0)]),
       which=st.sampled_from(["all", "no_t", "no_r", "none"]), seed=st.integers(0, 10_000))
@settings(max_examples=40)
def test_float64_matches_torch_backend(n, v, lam, scale, inf_cols, pad, temps, which, seed):
    if which in ("no_r", "none"):
        lam = 1.0  # the contract: zr is None only with lam == 1
    zs, zt, zr, y = make_problem(n, v, seed=seed, scale=scale, inf_cols=inf_cols)
    zs, zt, zr = (_slice_pad(z, v, pad) for z in _models(zs, zt, zr, which))
    g_lp, g_loss = _grads(n, torch.float64, seed)
    a, b, oa, ob = _both(zs, zt, zr, y, temps, lam, g_lp, g_loss)
    assert a.dtype == torch.float64 and a.shape == (9, n)
    for k in range(9):
        tol = 1e-10 * (1 + float(b[k].abs().max()))
        assert max_err(a[k], b[k]) <= tol, f"stat row {k}: {max_err(a[k], b[k])}"
    assert max_err(oa, ob) <= 1e-10 * (1 + float(ob.abs().max()))
    masked = y == IGN
    assert (a[:, masked] == 0).all() and (oa[masked] == 0).all()
    if inf_cols and v > inf_cols:  # -inf columns: p_s = 0 there, so exactly zero gradient
        assert (oa[:, v - inf_cols:] == 0).all()


@given(n=st.sampled_from([1, 5]), v=st.sampled_from([3, 200, 2500]), lam=st.sampled_from([1.0, 1.25]),
       big=st.sampled_from([1e4, -1e4]), seed=st.integers(0, 10_000))
@settings(max_examples=15)
def test_extreme_logits_and_running_max_moves(n, v, lam, big, seed):
    """One huge logit placed late in the row forces the running max to move across blocks."""
    zs, zt, zr, y = make_problem(n, v, seed=seed, scale=3.0, mask_frac=0.0)
    for i, z in enumerate((zs, zt, zr)):
        z[:, v - 1 - i % v] = big
        z[:, 0] = -big
    g_lp, g_loss = _grads(n, torch.float64, seed, zero_frac=0.0)
    a, b, oa, ob = _both(zs, zt, zr, y, (1.0, 0.9, 1.1), lam, g_lp, g_loss)
    assert torch.isfinite(a).all() and torch.isfinite(oa).all()
    for k in range(9):
        assert max_err(a[k], b[k]) <= 1e-10 * (1 + float(b[k].abs().max())), k
    assert max_err(oa, ob) <= 1e-10 * (1 + float(ob.abs().max()))


def _plain_in_dtype(zs, zt, zr, y, temps, lam, g_lp, g_loss):
    """Eager torch with every op in the input dtype: the per-dtype error baseline.

    Returns stats [9, N] and d(sum g_lp lp_s + g_loss L)/d zs, both in zs.dtype."""
    ts, tt, tr = temps
    zs = zs.detach().clone().requires_grad_(True)
    valid = y != IGN
    ys = y.clamp(min=0)[:, None]
    ls = torch.log_softmax(zs / ts, -1)
    lt = torch.log_softmax(zt / tt, -1)
    lr = torch.log_softmax(zr / tr, -1)
    p = ls.exp()
    e = [(p * l).sum(-1) for l in (ls, lt, lr)]
    lse = [torch.logsumexp(z / t, -1) for z, t in ((zs, ts), (zt, tt), (zr, tr))]
    lp = [l.gather(1, ys).squeeze(1) for l in (ls, lt, lr)]
    loss = e[0] - lam * e[1] - (1 - lam) * e[2]
    obj = torch.where(valid, g_lp.to(zs.dtype) * lp[0] + g_loss.to(zs.dtype) * loss, torch.zeros((), dtype=zs.dtype))
    (grad,) = torch.autograd.grad(obj.sum(), zs)
    stats = torch.stack([*lse, *lp, *e]).detach()
    stats = torch.where(valid[None], stats, torch.zeros((), dtype=stats.dtype))
    return stats, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@given(n=st.sampled_from([3, 17]), v=st.sampled_from([7, 129, 3001]), lam=st.sampled_from([0.5, 1.0, 1.25, 2.0]),
       temps=st.sampled_from([(1.0, 1.0, 1.0), (0.7, 1.0, 1.5)]), seed=st.integers(0, 10_000))
@settings(max_examples=10)
def test_low_precision_error_is_torch_like(dtype, n, v, lam, temps, seed):
    zs, zt, zr, y = make_problem(n, v, seed=seed, scale=4.0)
    low = [z.to(dtype) for z in (zs, zt, zr)]
    hi = [z.double() for z in low]  # truth: float64 math on the same rounded inputs
    g_lp, g_loss = _grads(n, torch.float64, seed, zero_frac=0.0)
    sd = torch.float32
    ours = cpu.rows_forward(*low, y, *temps, IGN)
    truth = tb.rows_forward(*hi, y, *temps, IGN)
    g_ours = cpu.rows_backward(*low, y, ours, g_lp.to(sd), g_loss.to(sd), lam, *temps, IGN, torch.empty_like(low[0]))
    g_truth = tb.rows_backward(*hi, y, truth, g_lp, g_loss, lam, *temps, IGN, torch.empty_like(hi[0]))
    base, g_base = _plain_in_dtype(*low, y, temps, lam, g_lp, g_loss)
    assert ours.dtype == torch.float64 and g_ours.dtype == dtype  # fp64 statistics for every input dtype
    for k in range(9):
        assert_close_as_torch(ours[k], base[k], truth[k], what=f"{dtype} stat {k}")
    assert_close_as_torch(g_ours, g_base, g_truth, what=f"{dtype} grad")


@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), n=st.sampled_from([1, 5, 17]),
       v=st.sampled_from([1, 7, 15, 16, 17, 129, 1025, 3001]), lam=st.sampled_from([0.0, 0.5, 1.0, 1.25, 3.0]),
       scale=st.sampled_from([1.0, 30.0, 1e4]), inf_cols=st.sampled_from([0, 3]), pad=st.sampled_from([0, 5]),
       temps=st.sampled_from([(1.0, 1.0, 1.0), (0.7, 1.0, 1.5)]), which=st.sampled_from(["all", "no_r"]),
       seed=st.integers(0, 10_000))
@settings(max_examples=30)
def test_vectorised_path_is_torch_like_on_ragged_extreme_masked_rows(dtype, n, v, lam, scale, inf_cols, pad, temps,
                                                                     which, seed):
    """The vectorised fp32 / bf16 / fp16 kernels (rows_simd.h, the path this CPU runs) on ragged V (tails
    of every length mod 8 and 16), logits up to 1e4, -inf columns, masked rows, strided rows and a missing
    reference: error vs a float64 truth on the same rounded inputs no worse than plain torch's in that
    dtype (gradients at 1e4: see the bound below; the fp64 statistics matter here: with an fp32 lse every
    recomputed log-prob would lose an ulp of |z / T|). torch's baseline runs on the finite columns only
    (the -inf ones add exactly 0 to every sum; on them plain torch's p * log p is nan)."""
    if which == "no_r":
        lam = 1.0  # the contract: zr is None only with lam == 1 (then the reference term is 0 anyway)
    if dtype == torch.float16:
        scale = min(scale, 30.0)  # plain fp16 torch, the baseline, turns 1e4 logits into nan
    zs, zt, zr, y = make_problem(n, v, seed=seed, scale=scale, inf_cols=inf_cols)
    low = [_slice_pad(z.to(dtype), v, pad) for z in (zs, zt, zr)]
    hi = [z.double() for z in low]
    g_lp, g_loss = _grads(n, torch.float64, seed)
    zr_arg = None if which == "no_r" else low[2]
    ours = cpu.rows_forward(low[0], low[1], zr_arg, y, *temps, IGN)
    truth = tb.rows_forward(hi[0], hi[1], None if which == "no_r" else hi[2], y, *temps, IGN)
    g_ours = cpu.rows_backward(low[0], low[1], zr_arg, y, ours, g_lp.float(), g_loss.float(), lam, *temps, IGN,
                               torch.empty(n, v, dtype=dtype))
    g_truth = tb.rows_backward(hi[0], hi[1], None if which == "no_r" else hi[2], y, truth, g_lp, g_loss, lam,
                               *temps, IGN, torch.empty(n, v, dtype=torch.float64))
    keep = v - inf_cols if (inf_cols and v > inf_cols) else v
    base, g_base = _plain_in_dtype(*(z[:, :keep] for z in low), y, temps, lam, g_lp, g_loss)
    rows = range(9) if which == "all" else (0, 1, 3, 4, 6, 7)
    for k in rows:
        assert_close_as_torch(ours[k], base[k], truth[k], what=f"{dtype} stat {k}")
    if which == "no_r":
        assert (ours[[2, 5, 8]] == 0).all()
    if scale <= 30:
        assert_close_as_torch(g_ours[:, :keep], g_base, g_truth[:, :keep], what=f"{dtype} grad")
    else:
        # Logits ~1e4: rows are one-hot and a log-prob far below the top is a number ~ -2e4 whose fp32
        # ulp is ~2e-3. Plain torch takes both c(v) and the loss L = sum p c from the same rounded
        # [N, V] log-softmax, so on a one-hot row c - L is exactly 0; a fused kernel gets L from the
        # forward's sums instead, so c - L carries that ulp. Bound: a few ulps of the largest scaled
        # logit times the gradient's coefficients (a wrong formula is off by O(1) of them).
        zmax = max(float(z[:, :keep].double().abs().max()) for z in hi) / min(temps)
        coef = (g_loss.abs() * (1 + abs(lam) + abs(1 - lam)) + g_lp.abs())[:, None]
        torch_err = float((g_base.double() - g_truth[:, :keep]).abs().max())
        out_ulp = torch.finfo(dtype).eps * g_truth[:, :keep].abs()  # the gradient is stored in `dtype`
        bound = torch.clamp(8 * torch.finfo(torch.float32).eps * zmax * coef, min=4 * torch_err) + out_ulp + 1e-6
        err = (g_ours[:, :keep].double() - g_truth[:, :keep]).abs()
        assert (err <= bound).all(), f"{dtype} grad at 1e4: error {float(err.max()):.3g}"
    assert (g_ours[:, keep:] == 0).all() and (g_ours[y == IGN] == 0).all()
    assert torch.isfinite(ours).all() and torch.isfinite(g_ours).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["all", "no_r"])
def test_inplace_backward_equals_out_of_place(dtype, which):
    lam = 1.25 if which == "all" else 1.0
    zs, zt, zr, y = make_problem(9, 2100, seed=3, inf_cols=2)
    zs, zt, zr = (None if z is None else z.to(dtype) for z in _models(zs, zt, zr, which))
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    g_lp, g_loss = _grads(9, sd, 3)
    stats = cpu.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGN)
    expect = cpu.rows_backward(zs, zt, zr, y, stats, g_lp, g_loss, lam, 1.0, 1.0, 1.0, IGN, torch.empty_like(zs))
    buf = zs.clone()
    got = cpu.rows_backward(buf, zt, zr, y, stats, g_lp, g_loss, lam, 1.0, 1.0, 1.0, IGN, buf)
    assert got.data_ptr() == buf.data_ptr()
    assert torch.equal(buf, expect)


@pytest.mark.parametrize("together", [False, True])
def test_thread_count_independence(together):
    zs, zt, zr, y = make_problem(37, 3001, seed=11, dtype=torch.float32, inf_cols=3)
    g_lp, g_loss = _grads(37, torch.float32, 11)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = torch.empty_like(zs)
            if together:
                stats = cpu.rows_forward_backward(zs, zt, zr, y, g_lp, g_loss, 1.25, 0.8, 1.0, 1.2, IGN, out)
            else:
                stats = cpu.rows_forward(zs, zt, zr, y, 0.8, 1.0, 1.2, IGN)
                cpu.rows_backward(zs, zt, zr, y, stats, g_lp, g_loss, 1.25, 0.8, 1.0, 1.2, IGN, out)
            results.append((stats, out))
    finally:
        torch.set_num_threads(before)
    (s1, o1), (s2, o2) = results
    # Each row's arithmetic order is fixed, so the results are bitwise equal (stronger than "to rounding").
    assert torch.equal(s1, s2) and torch.equal(o1, o2)


def test_empty_and_all_masked():
    zs, zt, zr, y = make_problem(4, 50, seed=0, dtype=torch.float32)
    y[:] = IGN
    stats = cpu.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGN)
    assert (stats == 0).all()
    out = torch.full_like(zs, 5.0)
    cpu.rows_backward(zs, zt, zr, y, stats, torch.ones(4), torch.ones(4), 1.5, 1.0, 1.0, 1.0, IGN, out)
    assert (out == 0).all()
    e = torch.empty(0, 50)
    assert cpu.rows_forward(e, None, None, torch.empty(0, dtype=torch.long), 1.0, 1.0, 1.0, IGN).shape == (9, 0)


def test_bad_inputs_raise():
    zs, zt, zr, y = make_problem(3, 20, seed=0, dtype=torch.float32, mask_frac=0.0)
    with pytest.raises(TypeError, match="dtype"):
        cpu.rows_forward(zs.to(torch.int32), None, None, y, 1.0, 1.0, 1.0, IGN)
    with pytest.raises(RuntimeError, match="shape"):
        cpu.rows_forward(zs, zt[:, :10], None, y, 1.0, 1.0, 1.0, IGN)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu.rows_forward(zs, zt, zr, torch.tensor([0, 20, 1]), 1.0, 1.0, 1.0, IGN)
    with pytest.raises(RuntimeError, match="stride"):
        cpu.rows_forward(zs.t().contiguous().t(), None, None, y, 1.0, 1.0, 1.0, IGN)
    with pytest.raises(ValueError, match="CPU tensor"):
        cpu.rows_forward(zs.to("meta"), None, None, y, 1.0, 1.0, 1.0, IGN)


# --- rows_forward_backward: forward and backward row by row ------------------------------------------

def _separate_then_together(zs, zt, zr, y, temps, lam, g_lp, g_loss, inplace):
    """(stats, grad) of rows_forward + rows_backward and of rows_forward_backward on the same inputs."""
    stats = cpu.rows_forward(zs, zt, zr, y, *temps, IGN)
    grad = cpu.rows_backward(zs, zt, zr, y, stats, g_lp, g_loss, lam, *temps, IGN, torch.empty_like(zs))
    if inplace:
        buf = zs.clone()
        stats2 = cpu.rows_forward_backward(buf, zt, zr, y, g_lp, g_loss, lam, *temps, IGN, buf)
        return (stats, grad), (stats2, buf)
    out = torch.full_like(zs, 7.0)  # every entry must be written, masked rows included
    stats2 = cpu.rows_forward_backward(zs, zt, zr, y, g_lp, g_loss, lam, *temps, IGN, out)
    return (stats, grad), (stats2, out)


@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
       n=st.sampled_from([1, 5, 17]), v=st.sampled_from([1, 16, 17, 1025, 3001]),
       lam=st.sampled_from([0.0, 0.5, 1.0, 1.25, 3.0]), scale=st.sampled_from([1.0, 30.0, 1e4]),
       inf_cols=st.sampled_from([0, 3]), pad=st.sampled_from([0, 5]),
       temps=st.sampled_from([(1.0, 1.0, 1.0), (0.7, 1.0, 1.5)]), which=st.sampled_from(["all", "no_r", "none"]),
       inplace=st.booleans(), seed=st.integers(0, 10_000))
@settings(max_examples=40)
def test_forward_backward_together_equals_separate(dtype, n, v, lam, scale, inf_cols, pad, temps, which, inplace,
                                                   seed):
    """rows_forward_backward runs each row's forward then its backward; it must give bit for bit what
    rows_forward followed by rows_backward gives (same per-row code, same arithmetic order), on every
    dtype, ragged V, extreme logits, -inf columns, masked and strided rows, missing models, in place."""
    if which != "all":
        lam = 1.0
    if dtype == torch.float16:
        scale = min(scale, 30.0)
    zs, zt, zr, y = make_problem(n, v, seed=seed, scale=scale, inf_cols=inf_cols)
    zs, zt, zr = (None if z is None else _slice_pad(z.to(dtype), v, pad) for z in _models(zs, zt, zr, which))
    g_lp, g_loss = _grads(n, torch.float64 if dtype == torch.float64 else torch.float32, seed)
    (s1, g1), (s2, g2) = _separate_then_together(zs, zt, zr, y, temps, lam, g_lp, g_loss, inplace)
    assert torch.equal(s1, s2)
    assert torch.equal(g1, g2)


def test_forward_backward_together_bad_inputs_raise():
    zs, zt, zr, y = make_problem(3, 20, seed=0, dtype=torch.float32, mask_frac=0.0)
    g = torch.ones(3)
    with pytest.raises(RuntimeError, match="out must be"):
        cpu.rows_forward_backward(zs, zt, zr, y, g, g, 1.0, 1.0, 1.0, 1.0, IGN, torch.empty(3, 19))
    with pytest.raises(RuntimeError, match="g_lp and g_loss"):
        cpu.rows_forward_backward(zs, zt, zr, y, torch.ones(2), g, 1.0, 1.0, 1.0, 1.0, IGN, torch.empty_like(zs))
    with pytest.raises(RuntimeError, match="out of range"):
        cpu.rows_forward_backward(zs, zt, zr, torch.tensor([0, 20, 1]), g, g, 1.0, 1.0, 1.0, 1.0, IGN,
                                  torch.empty_like(zs))
    e = torch.empty(0, 20)
    none = torch.empty(0)
    assert cpu.rows_forward_backward(e, None, None, torch.empty(0, dtype=torch.long), none, none, 1.0, 1.0, 1.0, 1.0,
                                     IGN, e).shape == (9, 0)


# --- end to end through the public API -------------------------------------------------------------

@given(n=st.sampled_from([1, 7, 33]), v=st.sampled_from([7, 129, 3001]), lam=st.sampled_from([0.0, 1.0, 1.25, 3.0]),
       mode=st.sampled_from(["sampled", "full"]), reduction=st.sampled_from(["mean", "sum", "none"]),
       inf_cols=st.sampled_from([0, 3]), seed=st.integers(0, 10_000))
@settings(max_examples=15)
def test_gopd_loss_cpu_matches_reference(n, v, lam, mode, reduction, inf_cols, seed):
    import gopd_kernels as gk
    from gopd_kernels import reference as R

    zs, zt, zr, y = make_problem(n, v, seed=seed, scale=5.0, inf_cols=inf_cols)
    kw = dict(lam=lam, mode=mode, reduction=reduction, temperature=(0.9, 1.0, 1.1))
    outs = []
    for fn, extra in ((gk.gopd_loss, dict(backend="cpu")), (R.gopd_loss, {})):
        x = zs.clone().requires_grad_(True)
        out = fn(x, y, zt, zr, **kw, **extra)
        up = torch.linspace(-1, 1, n, dtype=torch.float64) if reduction == "none" else torch.ones((), dtype=torch.float64)
        (g,) = torch.autograd.grad((out.loss * up).sum(), x)
        outs.append((out, g))
    (ours, g), (ref, g_ref) = outs
    assert max_err(ours.loss.detach(), ref.loss.detach()) <= 1e-9 * (1 + float(ref.loss.detach().abs().max()))
    assert max_err(g, g_ref) <= 1e-9 * (1 + float(g_ref.abs().max()))


def test_fused_linear_cpu_matches_reference_float64():
    import gopd_kernels as gk
    from gopd_kernels import reference as R

    g = torch.Generator().manual_seed(5)
    n, d, v = 19, 24, 301
    h = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(3)]
    w = [torch.randn(v, d, generator=g, dtype=torch.float64) / math.sqrt(d) * 3 for _ in range(3)]
    y = torch.randint(0, v, (n,), generator=g)
    y[::4] = IGN
    hs, ws = h[0].clone().requires_grad_(True), w[0].clone().requires_grad_(True)
    out = gk.fused_linear_gopd_loss(hs, ws, y, h[1], w[1], h[2], w[2], lam=1.25, mode="full", backend="cpu",
                                    chunk_size=8)
    dh, dw = torch.autograd.grad(out.loss, (hs, ws))
    hs2, ws2 = h[0].clone().requires_grad_(True), w[0].clone().requires_grad_(True)
    ref = R.gopd_loss(hs2 @ ws2.t(), y, h[1] @ w[1].t(), h[2] @ w[2].t(), lam=1.25, mode="full")
    dh2, dw2 = torch.autograd.grad(ref.loss, (hs2, ws2))
    assert max_err(out.loss.detach(), ref.loss.detach()) <= 1e-10
    assert max_err(dh, dh2) <= 1e-10 * (1 + float(dh2.abs().max()))
    assert max_err(dw, dw2) <= 1e-10 * (1 + float(dw2.abs().max()))


@pytest.mark.parametrize("dt_s,dt_t", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                       (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("mode", ["full", "sampled"])
def test_fused_linear_16bit_heads_match_reference(dt_s, dt_t, reduction, mode):
    """bf16 / fp16 heads on CPU, alone or next to fp32 ones: the logits are fp32 GEMMs of the up-cast
    inputs (the weights share one fp32 buffer across heads and chunks), so against the float64 reference
    on the same rounded inputs the loss is fp32-accurate and each gradient is off by its rounding to the
    head's dtype. Teacher with another hidden size and a padded vocabulary; 8-token chunks."""
    import gopd_kernels as gk
    from gopd_kernels import reference as R

    g = torch.Generator().manual_seed(21)
    n, v, d_s, d_t = 29, 301, 16, 24
    mk = lambda *shape, dt: (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.7).to(dt)  # noqa: E731
    hs, ws = mk(n, d_s, dt=dt_s), mk(v, d_s, dt=dt_s)
    ht, wt, hr, wr = mk(n, d_t, dt=dt_t), mk(v + 5, d_t, dt=dt_t), mk(n, d_s, dt=dt_s), mk(v, d_s, dt=dt_s)
    y = torch.randint(0, v, (n,), generator=g)
    y[::6] = IGN
    up = torch.linspace(-1, 2, n, dtype=torch.float64)
    params = [x.clone().requires_grad_(True) for x in (hs, ws)]
    out = gk.fused_linear_gopd_loss(params[0], params[1], y, ht, wt, hr, wr, lam=1.25, mode=mode,
                                    reduction=reduction, backend="cpu", chunk_size=8)
    loss = (out.loss.double() * up).sum() if reduction == "none" else out.loss.double()
    grads = torch.autograd.grad(loss, params)
    ref_params = [x.double().requires_grad_(True) for x in (hs, ws)]
    ref = R.gopd_loss(ref_params[0] @ ref_params[1].t(), y, ht.double() @ wt.double()[:v].t(),
                      hr.double() @ wr.double().t(), lam=1.25, mode=mode, reduction=reduction)
    ref_loss = (ref.loss * up).sum() if reduction == "none" else ref.loss
    ref_grads = torch.autograd.grad(ref_loss, ref_params)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * (1 + abs(float(ref_loss)))
    for name, a, b in zip(("dh", "dW"), grads, ref_grads):
        assert a.dtype == dt_s, name
        bound = torch.finfo(dt_s).eps * b.abs() + 1e-5 * (1 + float(b.abs().max()))
        assert ((a.double() - b).abs() <= bound).all(), f"{name}: error {max_err(a, b):.3g}"
    assert max_err(out.lp_t, ref.lp_t) <= 1e-5 * (1 + float(ref.lp_t.abs().max()))


ISAS = ("baseline", "avx2", "avx512")
_TINY_FLOOR = 2.0**-100


def _tiny_case(dtype):
    """Rows spread over ~95 nats: columns with p ~ 1e-37 and float64 gradients from ~1e-30 down into
    fp32's subnormal range (test_tiny_gradient_entries_are_zero_on_every_isa_path)."""
    n, v = 4, 4001
    ramp = -torch.linspace(0.0, 95.0, v, dtype=torch.float64)
    zs = torch.stack([ramp.roll(17 * i) for i in range(n)])
    low = [z.to(getattr(torch, dtype)) for z in (zs, zs.flip(1) * 0.5, zs * 1.1)]
    return dict(logits=low, y=torch.tensor([0, 5, 9, 4000]), temps=(1.0, 1.0, 1.0), lam=1.25,
                g_lp=torch.full((n,), 3e-4), g_loss=torch.full((n,), 1.0 / 2048))


def _isa_cases():
    cases = {}
    for dtype in ("float32", "bfloat16", "float16"):
        zs, zt, zr, y = make_problem(13, 2101, seed=7, dtype=getattr(torch, dtype), inf_cols=2)
        cases[f"agree-{dtype}"] = dict(logits=(zs, zt, zr), y=y, temps=(0.9, 1.0, 1.1), lam=1.25,
                                       g_lp=torch.ones(13), g_loss=torch.linspace(-1, 1, 13))
    zs, zt, zr, _ = make_problem(6, 333, seed=3, dtype=torch.float32, inf_cols=2)
    zs[0, 17] = zt[1, 100] = zr[2, 332] = float("nan")
    cases["nan"] = dict(logits=(zs, zt, zr), y=torch.arange(6) * 7, temps=(1.0, 1.0, 1.0), lam=1.25,
                        g_lp=torch.ones(6), g_loss=torch.ones(6))
    for dtype in ("float32", "bfloat16"):
        cases[f"tiny-{dtype}"] = _tiny_case(dtype)
    return cases


@pytest.fixture(scope="module")
def isa_runs(tmp_path_factory):
    """{isa: {case: dict(st, g, st2, o)}}: every ISA case below, run in one fresh process per ISA cap.

    The kernels are built for the baseline x86-64 ISA, AVX2 and AVX-512 and picked at run time;
    GOPD_CPU_ISA caps the ISA of a process; a cap above what the CPU has runs the best the CPU has, so
    on an AVX2-only CPU the avx512 run repeats avx2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tmp = tmp_path_factory.mktemp("isa")
    torch.save(_isa_cases(), tmp / "cases.pt")
    worker = Path(__file__).with_name("isa_worker.py")
    runs = {}
    for isa in ISAS:
        subprocess.run([sys.executable, str(worker), str(tmp / "cases.pt"), str(tmp / f"{isa}.pt")],
                       check=True, env=dict(os.environ, GOPD_CPU_ISA=isa), timeout=300)
        runs[isa] = torch.load(tmp / f"{isa}.pt")
    return runs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_isa_paths_agree(isa_runs, dtype):
    """Every ISA path this CPU can run gives the same result to rounding, and its fused forward-backward
    the same bits as its separate forward and backward."""
    results = {isa: isa_runs[isa][f"agree-{dtype}"] for isa in ISAS}
    for isa, r in results.items():
        assert torch.equal(r["st"], r["st2"]) and torch.equal(r["g"], r["o"]), f"{isa}: together != separate"
    s0, g0 = results["baseline"]["st"], results["baseline"]["g"].float()
    # One ulp of the gradient's dtype, relative to the row's largest entry (summation order and the
    # exp polynomial's rounding differ between paths; the math does not).
    ulp = {"float32": 1e-6, "bfloat16": 8e-3, "float16": 1e-3}[dtype]
    for isa in ("avx2", "avx512"):
        s1, g1 = results[isa]["st"], results[isa]["g"].float()
        assert torch.isfinite(s1).all(), isa
        assert max_err(s0, s1) <= 1e-5 * (1 + float(s1.abs().max())), isa
        assert max_err(g0, g1) <= ulp * (1 + float(g1.abs().max())), isa


def test_nan_logits_propagate_on_every_isa_path(isa_runs):
    """A NaN logit makes its row's statistics NaN (never a silently finite value from a clamped exp) on
    every ISA path, and leaves the other rows, -inf columns included, finite."""
    lse_s, lse_t, lse_r = 0, 1, 2
    for isa in ISAS:
        r = isa_runs[isa]["nan"]
        for stats, g in ((r["st"], r["g"]), (r["st2"], r["o"])):
            assert stats[lse_s, 0].isnan() and stats[lse_t, 1].isnan() and stats[lse_r, 2].isnan(), isa
            assert g[:3].isnan().any(1).all(), isa
            assert torch.isfinite(stats[:, 3:]).all() and torch.isfinite(g[3:]).all(), isa


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_gradient_entries_are_zero_on_every_isa_path(isa_runs, dtype):
    """Gradients from ~1e-30 down into fp32's subnormal range (_tiny_case): every ISA path writes the
    entries below 2^-100 as 0 (they would put subnormals into the GEMMs that consume the gradient, which
    x86 runs many-fold slower) and every other entry unchanged, so the error stays within 2^-100 of the
    truth plus plain torch's own error in the dtype."""
    floor = _TINY_FLOOR
    c = _tiny_case(dtype)
    hi = [z.double() for z in c["logits"]]
    g_lp, g_loss = c["g_lp"].double(), c["g_loss"].double()
    truth = tb.rows_forward(*hi, c["y"], 1.0, 1.0, 1.0, IGN)
    g_truth = tb.rows_backward(*hi, c["y"], truth, g_lp, g_loss, 1.25, 1.0, 1.0, 1.0, IGN, torch.empty_like(hi[0]))
    below = (g_truth != 0) & (g_truth.abs() < floor)
    tiny = torch.finfo(torch.float32).tiny
    # The case really has entries on both sides of FLT_MIN below the floor, and kept ones just above it.
    assert (below & (g_truth.abs() < tiny)).sum() > 50 and (below & (g_truth.abs() > tiny)).sum() > 50
    assert ((g_truth.abs() >= 2 * floor) & (g_truth.abs() < 2.0**-90)).sum() > 20
    _, g_base = _plain_in_dtype(*c["logits"], c["y"], (1.0, 1.0, 1.0), 1.25, g_lp, g_loss)
    torch_err = max_err(g_base, g_truth)
    kept = g_truth.abs() >= 2 * floor
    for isa in ISAS:
        r = isa_runs[isa][f"tiny-{dtype}"]
        for g in (r["g"], r["o"]):
            g64 = g.double()
            assert not ((g64 != 0) & (g64.abs() < floor)).any(), f"{isa}: entries below 2^-100 written"
            assert (g64[below] == 0).all(), isa
            assert (g64[kept] != 0).all(), f"{isa}: an entry above the floor was zeroed"
            err = max_err(g, g_truth)
            assert err <= 4 * torch_err + floor, f"{isa}: error {err:.3g} vs torch's {torch_err:.3g}"


def test_callers_floating_point_mode_is_restored():
    """The row kernels flush subnormals only while they run: afterwards torch's own ops, on this thread
    and on the pool's threads (a large elementwise op runs on all of them), produce subnormals again."""
    tiny = torch.finfo(torch.float32).tiny
    zs, zt, zr, y = make_problem(8, 513, seed=1)
    st = cpu.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGN)
    cpu.rows_backward(zs, zt, zr, y, st, torch.ones(8), torch.ones(8), 1.25, 1.0, 1.0, 1.0, IGN, torch.empty_like(zs))
    cpu.rows_forward_backward(zs, zt, zr, y, torch.ones(8), torch.ones(8), 1.25, 1.0, 1.0, 1.0, IGN,
                              torch.empty_like(zs))
    assert (torch.tensor([tiny]) * 0.01).item() != 0.0
    big = torch.full((1 << 21,), tiny) * 0.01
    assert (big != 0).all()


def test_bad_isa_cap_is_a_clear_error():
    import subprocess
    import sys

    env = dict(__import__("os").environ, GOPD_CPU_ISA="sse9")
    proc = subprocess.run([sys.executable, "-c", "import torch; from gopd_kernels.backends import cpu; "
                           "cpu.rows_forward(torch.zeros(2, 8), None, None, torch.zeros(2, dtype=torch.long), "
                           "1.0, 1.0, 1.0, -100)"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "GOPD_CPU_ISA" in proc.stderr and "avx512" in proc.stderr


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_linear_scalar_loss_runs_rows_together_and_matches(monkeypatch, reduction, dtype):
    """Full mode without rollout_logprobs: the per-token gradients are known before the forward, so the
    scalar-loss fused path calls rows_forward_backward (each row read once) instead of rows_forward +
    rows_backward. Its loss and dH / dW must be bit for bit those of the two-call path."""
    import gopd_kernels as gk
    from gopd_kernels import api

    g = torch.Generator().manual_seed(9)
    n, d, v = 45, 16, 777
    h = [torch.randn(n, d, generator=g, dtype=dtype) for _ in range(3)]
    w = [torch.randn(v, d, generator=g, dtype=dtype) * 0.5 for _ in range(3)]
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = IGN
    calls = {"together": 0, "forward": 0}
    for name in calls:
        real = getattr(cpu, f"rows_{'forward_backward' if name == 'together' else 'forward'}")

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(cpu, f"rows_{'forward_backward' if name == 'together' else 'forward'}", counted)

    def run():
        hs, ws = h[0].clone().requires_grad_(True), w[0].clone().requires_grad_(True)
        out = gk.fused_linear_gopd_loss(hs, ws, y, h[1], w[1], h[2], w[2], lam=1.5, mode="full", backend="cpu",
                                        chunk_size=16, reduction=reduction)
        out.loss.backward()
        return out.loss.detach(), hs.grad, ws.grad, out.kl

    together = run()
    assert calls == {"together": 3, "forward": 0}
    monkeypatch.setattr(api, "stat_free_gradients", lambda *a, **k: None)
    separate = run()
    assert calls == {"together": 3, "forward": 3}
    for a, b in zip(together, separate):
        assert torch.equal(a, b)
