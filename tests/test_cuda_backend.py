"""The CUDA backend's row kernels against the plain-torch backend (gopd_kernels.backends.torch).

Skipped unless the CUDA backend is available (a GPU, and the extension built with its CUDA kernels).
Truth is the torch backend on float64 copies of the very same (possibly rounded) inputs; our error
against it may exceed the torch backend's own error on the same fp32 / bf16 / fp16 inputs by a small
factor only (the Cut-Cross-Entropy judgement of tests/helpers.py), never a loose blanket tolerance.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gopd_kernels.backends import NSTATS
from gopd_kernels.backends import cuda as cuda_backend
from gopd_kernels.backends import torch as torch_backend

from helpers import assert_close_as_torch, make_problem

_OK, _WHY = cuda_backend.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"cuda backend not available: {_WHY}")

IGNORE = -100
DEVICE = "cuda"


def _inputs(n, v, *, seed, scale, inf_cols, pad, offset, dtype, has_t, has_r):
    """Logits on the GPU in `dtype`, as column slices [:, offset:offset+v] of wider rows (pad / offset
    > 0 gives row strides that are not multiples of 16 bytes, or misaligned row starts: the kernels'
    scalar path), plus float64 copies of the same rounded values for the truth."""
    zs, zt, zr, y = make_problem(n, v + offset, seed=seed, scale=scale, inf_cols=0, pad=pad)
    g = torch.Generator().manual_seed(seed + 1)
    if inf_cols and v > inf_cols:  # the same columns -inf in all models; targets avoid them
        cols = torch.randperm(v, generator=g)[:inf_cols] + offset
        for z in (zs, zt, zr):
            z[:, cols] = float("-inf")
    y = torch.where((y >= v) & (y != IGNORE), y % v, y)
    if inf_cols and v > inf_cols:
        y = torch.where(torch.isin(y + offset, cols), torch.full_like(y, IGNORE), y)
    low = [z.to(dtype).to(DEVICE)[:, offset:offset + v] for z in (zs, zt, zr)]
    truth = [z.double() for z in low]
    keep = (True, has_t, has_r)
    pick = lambda zz: [z if k else None for z, k in zip(zz, keep)]  # noqa: E731
    return pick(low), pick(truth), y.to(DEVICE)


def _upstream(n, seed, lam_zero_rows=True):
    g = torch.Generator().manual_seed(seed + 2)
    g_lp = torch.randn(n, generator=g, dtype=torch.float64)
    g_loss = torch.randn(n, generator=g, dtype=torch.float64)
    if lam_zero_rows and n > 2:
        g_loss[::3] = 0.0  # the backward's "g_loss == 0 drops the term" path
        g_lp[1::4] = 0.0
    return g_lp.to(DEVICE), g_loss.to(DEVICE)


def _run(backend, models, y, temps, lam, g_lp, g_loss):
    zs, zt, zr = models
    stats = backend.rows_forward(zs, zt, zr, y, *temps, IGNORE)
    cdt = stats.dtype
    grad = backend.rows_backward(zs, zt, zr, y, stats, g_lp.to(cdt), g_loss.to(cdt), lam, *temps, IGNORE,
                                 torch.empty_like(zs))
    return stats, grad


def _judge(models, truth_models, y, temps, lam, seed, what):
    g_lp, g_loss = _upstream(y.numel(), seed)
    ours = _run(cuda_backend, models, y, temps, lam, g_lp, g_loss)
    base = _run(torch_backend, models, y, temps, lam, g_lp, g_loss)
    truth = _run(torch_backend, truth_models, y, temps, lam, g_lp, g_loss)
    assert ours[0].shape == (NSTATS, y.numel()) and ours[0].dtype == torch.float32
    assert ours[1].shape == models[0].shape and ours[1].dtype == models[0].dtype
    for row in range(NSTATS):
        assert_close_as_torch(ours[0][row], base[0][row], truth[0][row], what=f"{what} stats[{row}]")
    assert_close_as_torch(ours[1], base[1], truth[1], what=f"{what} grad")
    valid = y != IGNORE
    assert (ours[0][:, ~valid] == 0).all(), "masked rows must have zero stats"
    assert (ours[1][~valid] == 0).all(), "masked rows must have zero gradient"
    for row, present in ((1, models[1] is not None), (2, models[2] is not None)):
        if not present:
            assert (ours[0][[row, row + 3, row + 6]] == 0).all(), "an absent model must have zero stats"
    assert torch.isfinite(ours[1]).all(), "gradient must be finite (no 0 * -inf)"


@given(n=st.sampled_from([1, 7, 33]), v=st.sampled_from([1, 7, 129, 2049, 3001]),
       lam=st.sampled_from([0.0, 0.5, 1.0, 1.25, 3.0]), scale=st.sampled_from([1.0, 30.0, 1e4]),
       inf_cols=st.sampled_from([0, 3]), pad=st.sampled_from([0, 5]), offset=st.sampled_from([0, 1]),
       models=st.sampled_from([(True, True), (True, False), (False, True), (False, False)]),
       temps=st.sampled_from([(1.0, 1.0, 1.0), (0.7, 1.0, 1.5)]), seed=st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_fp32_matches_torch_backend(n, v, lam, scale, inf_cols, pad, offset, models, temps, seed):
    has_t, has_r = models
    if not has_r and lam != 1.0:
        lam = 1.0  # the contract: zr is None only with lam == 1
    low, truth, y = _inputs(n, v, seed=seed, scale=scale, inf_cols=inf_cols, pad=pad, offset=offset,
                            dtype=torch.float32, has_t=has_t, has_r=has_r)
    _judge(low, truth, y, temps, lam, seed, f"fp32 n={n} v={v} lam={lam} scale={scale}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(n=st.sampled_from([1, 7, 33]), v=st.sampled_from([7, 129, 3001]), lam=st.sampled_from([0.0, 1.0, 1.25, 3.0]),
       scale=st.sampled_from([1.0, 30.0]), inf_cols=st.sampled_from([0, 3]), offset=st.sampled_from([0, 1]),
       seed=st.integers(0, 1000))
@settings(max_examples=15, deadline=None)
def test_low_precision_matches_torch_backend(dtype, n, v, lam, scale, inf_cols, offset, seed):
    low, truth, y = _inputs(n, v, seed=seed, scale=scale, inf_cols=inf_cols, pad=0, offset=offset, dtype=dtype,
                            has_t=True, has_r=True)
    _judge(low, truth, y, (1.0, 0.9, 1.1), lam, seed, f"{dtype} n={n} v={v} lam={lam}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_bf16_and_fp32(dtype):
    low, truth, y = _inputs(9, 3001, seed=5, scale=1e4, inf_cols=3, pad=0, offset=0, dtype=dtype, has_t=True,
                            has_r=True)
    _judge(low, truth, y, (1.0, 1.0, 1.0), 1.25, 5, f"{dtype} +-1e4")


@pytest.mark.parametrize("v", [200, 5000])
def test_online_rescaling_and_leading_inf_columns(v):
    """Ascending student logits raise the running max in every chunk of every thread; the first
    columns are -inf in all models (empty partial states must merge without NaN)."""
    base = torch.linspace(-50, 50, v, dtype=torch.float64)
    zs = base.repeat(4, 1) + torch.randn(4, v, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    zt = base.flip(0).repeat(4, 1) * 0.5
    zr = (base * 0.2).repeat(4, 1)
    for z in (zs, zt, zr):
        z[:, :40] = float("-inf")
    y = torch.tensor([v - 1, v // 2, IGNORE, 41], device=DEVICE)
    low = [z.float().to(DEVICE) for z in (zs, zt, zr)]
    _judge(low, [z.double() for z in low], y, (1.0, 0.9, 1.1), 1.25, 2, f"ascending v={v}")


@pytest.mark.parametrize("v", [7, 3001])
def test_in_place_backward_equals_out_of_place(v):
    low, _, y = _inputs(8, v, seed=3, scale=3.0, inf_cols=0, pad=0, offset=0, dtype=torch.float32, has_t=True,
                        has_r=True)
    zs, zt, zr = low
    g_lp, g_loss = _upstream(8, 3)
    stats = cuda_backend.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGNORE)
    expected = cuda_backend.rows_backward(zs, zt, zr, y, stats, g_lp.float(), g_loss.float(), 1.25, 1.0, 1.0, 1.0,
                                          IGNORE, torch.empty_like(zs))
    buf = zs.clone()
    got = cuda_backend.rows_backward(buf, zt, zr, y, stats, g_lp.float(), g_loss.float(), 1.25, 1.0, 1.0, 1.0,
                                     IGNORE, buf)
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_all_masked_and_empty():
    zs, zt, zr, y = make_problem(5, 129, dtype=torch.float32, device=DEVICE)
    y[:] = IGNORE
    stats = cuda_backend.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGNORE)
    assert (stats == 0).all()
    out = torch.full_like(zs, 7.0)
    cuda_backend.rows_backward(zs, zt, zr, y, stats, torch.ones(5, device=DEVICE), torch.ones(5, device=DEVICE),
                               1.25, 1.0, 1.0, 1.0, IGNORE, out)
    assert (out == 0).all()
    empty = cuda_backend.rows_forward(zs[:0], zt[:0], zr[:0], y[:0], 1.0, 1.0, 1.0, IGNORE)
    assert empty.shape == (NSTATS, 0)


def test_rejects_float64_and_cpu_tensors():
    zs, zt, zr, y = make_problem(3, 11, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        cuda_backend.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGNORE)
    with pytest.raises(ValueError, match="CUDA tensor"):
        cuda_backend.rows_forward(zs.float().cpu(), None, None, y.cpu(), 1.0, 1.0, 1.0, IGNORE)
