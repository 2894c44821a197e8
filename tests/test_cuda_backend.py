"""The CUDA backend's row kernels against the plain-torch backend (gopd_kernels.backends.torch).

Two implementations are judged by the same tests:
- "cuda": the real kernels on a GPU; skipped unless the CUDA backend is available (a GPU, and the
  extension built with its CUDA kernels).
- "emulated": the kernels' own row math (csrc/cuda/rows.cu's RowState, write_row_stats,
  make_row_const, column_grad) compiled for the host with nvcc (csrc/cuda/emulate_rows.cuh), with the
  forward's thread layout replayed sequentially on CPU tensors; skipped unless nvcc is found. This
  checks the online-softmax algebra (rescaling, merges, -inf handling) where there is no GPU; the
  device-only parts (vector loads, shuffles, launch geometry) are only checked by "cuda".
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

IGNORE = -100
_CUDA_OK, _CUDA_WHY = cuda_backend.available()


@pytest.fixture(scope="module")
def emulated(emulated_cuda):
    return emulated_cuda  # tests/conftest.py builds it once per session


@pytest.fixture(scope="module", params=["cuda", "emulated"])
def impl(request):
    """(backend, device) for the implementation under test."""
    if request.param == "cuda":
        if not _CUDA_OK:
            pytest.skip(f"cuda backend not available: {_CUDA_WHY}")
        return cuda_backend, "cuda"
    return request.getfixturevalue("emulated"), "cpu"


def _inputs(n, v, *, seed, scale, inf_cols, pad, offset, dtype, has_t, has_r, device):
    """Logits on `device` in `dtype`, as column slices [:, offset:offset+v] of wider rows (pad / offset
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
    low = [z.to(dtype).to(device)[:, offset:offset + v] for z in (zs, zt, zr)]
    truth = [z.double() for z in low]
    keep = (True, has_t, has_r)
    pick = lambda zz: [z if k else None for z, k in zip(zz, keep)]  # noqa: E731
    return pick(low), pick(truth), y.to(device)


def _upstream(n, seed, device):
    g = torch.Generator().manual_seed(seed + 2)
    g_lp = torch.randn(n, generator=g, dtype=torch.float64)
    g_loss = torch.randn(n, generator=g, dtype=torch.float64)
    if n > 2:
        g_loss[::3] = 0.0  # the backward's "g_loss == 0 drops the term" path
        g_lp[1::4] = 0.0
    return g_lp.to(device), g_loss.to(device)


def _run(backend, models, y, temps, lam, g_lp, g_loss):
    zs, zt, zr = models
    stats = backend.rows_forward(zs, zt, zr, y, *temps, IGNORE)
    cdt = stats.dtype
    grad = backend.rows_backward(zs, zt, zr, y, stats, g_lp.to(cdt), g_loss.to(cdt), lam, *temps, IGNORE,
                                 torch.empty_like(zs))
    return stats, grad


def _judge(backend, models, truth_models, y, temps, lam, seed, what):
    g_lp, g_loss = _upstream(y.numel(), seed, y.device)
    ours = _run(backend, models, y, temps, lam, g_lp, g_loss)
    base = _run(torch_backend, models, y, temps, lam, g_lp, g_loss)
    truth = _run(torch_backend, truth_models, y, temps, lam, g_lp, g_loss)
    assert ours[0].shape == (NSTATS, y.numel()) and ours[0].dtype == torch.float64
    assert ours[1].shape == models[0].shape and ours[1].dtype == models[0].dtype
    for row in range(NSTATS):
        assert_close_as_torch(ours[0][row].cpu(), base[0][row].cpu(), truth[0][row].cpu(),
                              what=f"{what} stats[{row}]")
    assert_close_as_torch(ours[1].cpu(), base[1].cpu(), truth[1].cpu(), what=f"{what} grad")
    valid = (y != IGNORE).cpu()
    stats, grad = ours[0].cpu(), ours[1].cpu()
    assert (stats[:, ~valid] == 0).all(), "masked rows must have zero stats"
    assert (grad[~valid] == 0).all(), "masked rows must have zero gradient"
    for row, present in ((1, models[1] is not None), (2, models[2] is not None)):
        if not present:
            assert (stats[[row, row + 3, row + 6]] == 0).all(), "an absent model must have zero stats"
    assert torch.isfinite(grad).all(), "gradient must be finite (no 0 * -inf)"


@given(n=st.sampled_from([1, 7, 33]), v=st.sampled_from([1, 7, 129, 2049, 3001]),
       lam=st.sampled_from([0.0, 0.5, 1.0, 1.25, 3.0]), scale=st.sampled_from([1.0, 30.0, 1e4]),
       inf_cols=st.sampled_from([0, 3]), pad=st.sampled_from([0, 5]), offset=st.sampled_from([0, 1]),
       models=st.sampled_from([(True, True), (True, False), (False, True), (False, False)]),
       temps=st.sampled_from([(1.0, 1.0, 1.0), (0.7, 1.0, 1.5)]), seed=st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_fp32_matches_torch_backend(impl, n, v, lam, scale, inf_cols, pad, offset, models, temps, seed):
    backend, device = impl
    has_t, has_r = models
    if not has_r and lam != 1.0:
        lam = 1.0  # the contract: zr is None only with lam == 1
    low, truth, y = _inputs(n, v, seed=seed, scale=scale, inf_cols=inf_cols, pad=pad, offset=offset,
                            dtype=torch.float32, has_t=has_t, has_r=has_r, device=device)
    _judge(backend, low, truth, y, temps, lam, seed, f"fp32 n={n} v={v} lam={lam} scale={scale}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(n=st.sampled_from([1, 7, 33]), v=st.sampled_from([7, 129, 3001]), lam=st.sampled_from([0.0, 1.0, 1.25, 3.0]),
       scale=st.sampled_from([1.0, 30.0]), inf_cols=st.sampled_from([0, 3]), offset=st.sampled_from([0, 1]),
       seed=st.integers(0, 1000))
@settings(max_examples=10, deadline=None)
def test_low_precision_matches_torch_backend(impl, dtype, n, v, lam, scale, inf_cols, offset, seed):
    backend, device = impl
    low, truth, y = _inputs(n, v, seed=seed, scale=scale, inf_cols=inf_cols, pad=0, offset=offset, dtype=dtype,
                            has_t=True, has_r=True, device=device)
    _judge(backend, low, truth, y, (1.0, 0.9, 1.1), lam, seed, f"{dtype} n={n} v={v} lam={lam}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_bf16_and_fp32(impl, dtype):
    backend, device = impl
    low, truth, y = _inputs(9, 3001, seed=5, scale=1e4, inf_cols=3, pad=0, offset=0, dtype=dtype, has_t=True,
                            has_r=True, device=device)
    _judge(backend, low, truth, y, (1.0, 1.0, 1.0), 1.25, 5, f"{dtype} +-1e4")


@pytest.mark.parametrize("v", [200, 5000])
def test_online_rescaling_and_leading_inf_columns(impl, v):
    """Ascending student logits raise the running max in every chunk of every thread; the first
    columns are -inf in all models (empty partial states must merge without NaN)."""
    backend, device = impl
    base = torch.linspace(-50, 50, v, dtype=torch.float64)
    zs = base.repeat(4, 1) + torch.randn(4, v, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    zt = base.flip(0).repeat(4, 1) * 0.5
    zr = (base * 0.2).repeat(4, 1)
    for z in (zs, zt, zr):
        z[:, :40] = float("-inf")
    y = torch.tensor([v - 1, v // 2, IGNORE, 41], device=device)
    low = [z.float().to(device) for z in (zs, zt, zr)]
    _judge(backend, low, [z.double() for z in low], y, (1.0, 0.9, 1.1), 1.25, 2, f"ascending v={v}")


@pytest.mark.parametrize("v", [7, 3001])
def test_in_place_backward_equals_out_of_place(impl, v):
    backend, device = impl
    low, _, y = _inputs(8, v, seed=3, scale=3.0, inf_cols=0, pad=0, offset=0, dtype=torch.float32, has_t=True,
                        has_r=True, device=device)
    zs, zt, zr = low
    g_lp, g_loss = (t.float() for t in _upstream(8, 3, device))
    stats = backend.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGNORE)
    expected = backend.rows_backward(zs, zt, zr, y, stats, g_lp, g_loss, 1.25, 1.0, 1.0, 1.0, IGNORE,
                                     torch.empty_like(zs))
    buf = zs.clone()
    got = backend.rows_backward(buf, zt, zr, y, stats, g_lp, g_loss, 1.25, 1.0, 1.0, 1.0, IGNORE, buf)
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_all_masked_and_empty(impl):
    backend, device = impl
    zs, zt, zr, y = make_problem(5, 129, dtype=torch.float32, device=device)
    y[:] = IGNORE
    stats = backend.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGNORE)
    assert (stats == 0).all()
    out = torch.full_like(zs, 7.0)
    backend.rows_backward(zs, zt, zr, y, stats, torch.ones(5, device=device), torch.ones(5, device=device),
                          1.25, 1.0, 1.0, 1.0, IGNORE, out)
    assert (out == 0).all()
    empty = backend.rows_forward(zs[:0], zt[:0], zr[:0], y[:0], 1.0, 1.0, 1.0, IGNORE)
    assert empty.shape == (NSTATS, 0)


@pytest.mark.skipif(not _CUDA_OK, reason=f"cuda backend not available: {_CUDA_WHY}")
def test_rejects_float64_and_cpu_tensors():
    zs, zt, zr, y = make_problem(3, 11, dtype=torch.float64, device="cuda")
    with pytest.raises(TypeError, match="float64"):
        cuda_backend.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGNORE)
    with pytest.raises(ValueError, match="CUDA tensor"):
        cuda_backend.rows_forward(zs.float().cpu(), None, None, y.cpu(), 1.0, 1.0, 1.0, IGNORE)


def test_unavailable_reason_is_clear():
    ok, why = cuda_backend.available()
    assert ok or ("GPU" in why or "extension" in why or "registered" in why), why


def _nan_cases():
    """(name, zs, zt, zr, y): NaN logits where the kernels' online state could drop them."""
    zs, zt, zr, _ = make_problem(5, 41, seed=8, dtype=torch.float32)
    y = torch.arange(5) * 7
    first = zs.clone()
    first[0, 17] = float("nan")  # column 17: the first column some thread sees (warp per row, 32 threads)
    yield "student nan, a thread's first column", first, zt, zr, y
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(3, 4096, generator=g)
    wide[:, 0] = float("nan")
    wide[:, 5] = 200.0  # the running max jumps by ~200 after the NaN: exp underflows to 0
    yield "student nan, then a jump of the max", wide, None, None, torch.tensor([1, 2, 3])
    t_nan = zt.clone()
    t_nan[1, 0] = float("nan")
    s_jump = zs.clone()
    s_jump[1, 32] = 300.0  # the student's max jumps in the thread that saw the teacher's NaN
    yield "teacher nan, student max jumps", s_jump, t_nan, zr, y
    r_nan = torch.randn(2, 3001, generator=g)
    r_nan[:, 4] = float("nan")
    s_big = torch.randn(2, 3001, generator=g)
    s_big[:, 4 + 256 * 4] = 500.0  # block per row: same thread, next vector, far larger student logit
    yield "reference nan, block per row", s_big, torch.randn(2, 3001, generator=g), r_nan, torch.tensor([0, 7])


@pytest.mark.parametrize("case", range(4))
def test_nan_logits_are_never_dropped(impl, case):
    """A NaN logit makes the statistics of its row NaN exactly where the torch backend's are, also when
    it is the first column a thread sees or the running max later jumps so far that the old partial sums
    scale by exp(-huge) = 0 (the state emptied there would drop the NaN)."""
    backend, device = impl
    name, zs, zt, zr, y = list(_nan_cases())[case]
    dev = lambda z: None if z is None else z.to(device)  # noqa: E731
    ours = backend.rows_forward(dev(zs), dev(zt), dev(zr), y.to(device), 1.0, 1.0, 1.0, IGNORE).cpu()
    want = torch_backend.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGNORE)
    assert want.isnan().any(), name
    assert torch.equal(ours.isnan(), want.isnan()), f"{name}:\nours {ours}\ntorch {want}"
    finite = ~want.isnan()
    torch.testing.assert_close(ours[finite].double(), want[finite].double(), rtol=1e-5, atol=1e-5, msg=name)
