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

import ctypes
import os
import pathlib
import shutil
import subprocess

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
_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _nvcc():
    found = os.environ.get("NVCC") or shutil.which("nvcc")
    if not found and os.environ.get("CUDA_HOME"):
        cand = pathlib.Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        found = str(cand) if cand.exists() else None
    return found


class _Emulated:
    """The row contract on CPU tensors through the host build of the kernels' row math."""

    def __init__(self, lib):
        self.lib = lib

    def _models(self, zs, zt, zr, ts, tt, tr):
        ms = [(z.float(), float(t), i) for i, (z, t) in enumerate(((zs, ts), (zt, tt), (zr, tr))) if z is not None]
        nm = len(ms)
        strides = [z.stride(0) if z.shape[0] > 1 else z.shape[1] for z, _, _ in ms]
        vec = all(z.data_ptr() % 16 == 0 and (s * 4) % 16 == 0 for (z, _, _), s in zip(ms, strides))
        return (nm, (ctypes.c_void_p * nm)(*[z.data_ptr() for z, _, _ in ms]), (ctypes.c_int64 * nm)(*strides),
                (ctypes.c_float * nm)(*[t for _, t, _ in ms]), (ctypes.c_int * nm)(*[i for _, _, i in ms]), vec,
                ms)

    def rows_forward(self, zs, zt, zr, y, ts, tt, tr, ignore_index):
        n, v = zs.shape
        nm, ptrs, strides, temps, ids, vec, _keep = self._models(zs, zt, zr, ts, tt, tr)
        stats = torch.empty(NSTATS, n, dtype=torch.float32)
        y = y.contiguous()
        if n:
            self.lib.emu_forward(nm, ptrs, strides, temps, ids, ctypes.c_void_p(y.data_ptr()), ctypes.c_int64(n),
                                 ctypes.c_int64(v), ctypes.c_int64(ignore_index), ctypes.c_void_p(stats.data_ptr()),
                                 int(vec))
        return stats

    def rows_backward(self, zs, zt, zr, y, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out):
        n, v = zs.shape
        nm, ptrs, strides, temps, ids, _vec, _keep = self._models(zs, zt, zr, ts, tt, tr)
        stats, g_lp, g_loss = (t.float().contiguous() for t in (stats, g_lp, g_loss))
        y = y.contiguous()
        o = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32)
        if n and v:
            p = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
            self.lib.emu_backward(nm, ptrs, strides, temps, ids, p(y), p(stats), p(g_lp), p(g_loss), ctypes.c_int64(n),
                                  ctypes.c_int64(v), ctypes.c_float(lam), ctypes.c_int64(ignore_index), p(o),
                                  ctypes.c_int64(o.stride(0) if n > 1 else v))
        if o is not out:
            out.copy_(o)
        return out


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the host emulation of the CUDA row math needs it")
    lib = tmp_path_factory.mktemp("gopd_emu") / "libgopd_emu.so"
    cmd = [nvcc, "-O2", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-x", "cu",
           str(_ROOT / "csrc" / "cuda" / "emulate_rows.cuh"), "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"nvcc failed on the host emulation:\n{res.stderr[-4000:]}"
    return _Emulated(ctypes.CDLL(str(lib)))


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
    assert ours[0].shape == (NSTATS, y.numel()) and ours[0].dtype == torch.float32
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
