"""The Triton backend against the plain-torch backend (float64 oracle) and the reference.

Runs natively on a CUDA GPU; without one, on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, which must be set before triton is first imported). Shapes stay small
because the interpreter is slow. Low-precision results are judged the Cut-Cross-Entropy way:
our error against float64 may exceed plain torch's error in the same dtype by a small factor.
"""

import os
import sys

import pytest
import torch

from helpers import assert_close_as_torch, make_problem, triton_device

triton, DEVICE = triton_device()
ON_GPU = DEVICE == "cuda"

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import gopd_kernels as gk  # noqa: E402
from gopd_kernels import reference as R  # noqa: E402
from gopd_kernels.backends import E_R, E_T, LP_R, LP_T, LSE_R, LSE_T, NSTATS  # noqa: E402
from gopd_kernels.backends import torch as torch_backend  # noqa: E402
from gopd_kernels.backends import triton as triton_backend  # noqa: E402
from gopd_kernels.triton import rows as K  # noqa: E402

# The interpreter evaluates both sides of every tl.where with numpy, so masked-out lanes
# (0 * -inf, log 0 on masked rows) emit RuntimeWarnings whose results are discarded by design.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

IGNORE = -100
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _models(zs, zt, zr, has_t, has_r):
    return zs, (zt if has_t else None), (zr if has_r else None)


def _run_ours(zs, zt, zr, y, temps, lam, g_lp, g_loss, block_v):
    stats = K.rows_forward(zs, zt, zr, y, *temps, IGNORE, block_v=block_v)
    grad = K.rows_backward(zs, zt, zr, y, stats, g_lp, g_loss, lam, *temps, IGNORE, torch.empty_like(zs),
                           block_v=block_v)
    return stats, grad


def _run_torch(zs, zt, zr, y, temps, lam, g_lp, g_loss):
    stats = torch_backend.rows_forward(zs, zt, zr, y, *temps, IGNORE)
    grad = torch_backend.rows_backward(zs, zt, zr, y, stats, g_lp, g_loss, lam, *temps, IGNORE,
                                       torch.empty_like(zs))
    return stats, grad


def _check_against_oracle(zs, zt, zr, y, temps, lam, block_v, seed, factor=4.0):
    """Triton vs float64 truth (torch backend on the same rounded inputs) vs torch in the same dtype."""
    n = zs.shape[0]
    acc = torch.float64 if zs.dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(seed)
    g_lp = torch.randn(n, generator=g, dtype=torch.float64).to(zs.device)
    g_loss = torch.randn(n, generator=g, dtype=torch.float64).to(zs.device)

    def up(z):
        return None if z is None else z.double()

    truth_stats, truth_grad = _run_torch(up(zs), up(zt), up(zr), y, temps, lam, g_lp, g_loss)
    same_stats, same_grad = _run_torch(zs, zt, zr, y, temps, lam, g_lp.to(acc), g_loss.to(acc))
    stats, grad = _run_ours(zs, zt, zr, y, temps, lam, g_lp.to(acc), g_loss.to(acc), block_v)

    assert stats.shape == (NSTATS, n) and stats.dtype == torch.float64  # fp64 statistics for every input
    assert grad.dtype == zs.dtype and grad.shape == zs.shape
    names = ["LSE_S", "LSE_T", "LSE_R", "LP_S", "LP_T", "LP_R", "E_S", "E_T", "E_R"]
    for k, name in enumerate(names):
        assert_close_as_torch(stats[k].cpu(), same_stats[k].cpu(), truth_stats[k].cpu(), factor=factor,
                              what=f"stats {name} ({zs.dtype}, block {block_v})")
    assert_close_as_torch(grad.cpu(), same_grad.cpu(), truth_grad.cpu(), factor=factor,
                          what=f"grad ({zs.dtype}, block {block_v})")
    # Masked rows: zero stats, zero gradient; models that are None: zero stats.
    masked = (y == IGNORE).cpu()
    assert torch.all(stats.cpu()[:, masked] == 0) and torch.all(grad.cpu()[masked] == 0)
    if zt is None:
        assert torch.all(stats[[LSE_T, LP_T, E_T]] == 0)
    if zr is None:
        assert torch.all(stats[[LSE_R, LP_R, E_R]] == 0)
    return stats, grad


@given(seed=st.integers(0, 10_000), n=st.sampled_from([1, 3, 8]), v=st.sampled_from([1, 7, 129, 3001]),
       dtype=st.sampled_from(DTYPES), lam=st.sampled_from([0.0, 0.3, 1.0, 1.25, 3.0]),
       scale=st.sampled_from([1.0, 30.0, 1e4]), temps=st.sampled_from([(1.0, 1.0, 1.0), (0.7, 1.3, 2.0)]),
       models=st.sampled_from(["tr", "t", "", "r"]), inf_cols=st.sampled_from([0, 3]),
       block_v=st.sampled_from([None, 16, 128]))
@settings(max_examples=40, deadline=None)
def test_rows_match_the_float64_oracle(seed, n, v, dtype, lam, scale, temps, models, inf_cols, block_v):
    has_t, has_r = "t" in models, "r" in models
    if not has_r:
        lam = 1.0  # the contract: no reference only at lam == 1
    zs, zt, zr, y = make_problem(n, v, seed=seed, dtype=dtype, scale=scale, inf_cols=inf_cols, device=DEVICE)
    zs, zt, zr = _models(zs, zt, zr, has_t, has_r)
    _check_against_oracle(zs, zt, zr, y, temps, lam, block_v, seed)


@pytest.mark.parametrize("block_v", [8, 64])
def test_online_rescaling_across_tiles(block_v):
    """Ascending logits raise the running max on every tile; leading -inf tiles come first."""
    n, v = 4, 200
    base = torch.linspace(-50, 50, v, dtype=torch.float64)
    zs = base.repeat(n, 1) + torch.randn(n, v, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    zt = base.flip(0).repeat(n, 1) * 0.5
    zr = (base * 0.2).repeat(n, 1)
    for z in (zs, zt, zr):
        z[:, :20] = float("-inf")  # the first tiles are entirely -inf for block_v <= 16
    y = torch.tensor([199, 50, IGNORE, 21])
    args = [z.to(DEVICE, torch.float32) for z in (zs, zt, zr)]
    _check_against_oracle(*args, y.to(DEVICE), (1.0, 0.9, 1.1), 1.25, block_v, seed=2)


def test_default_block_matches_small_tiles_on_a_large_vocab():
    """V larger than the default tile (4096) with the adapter's own tile choice."""
    zs, zt, zr, y = make_problem(2, 9001, seed=7, dtype=torch.float32, scale=5.0, inf_cols=5, device=DEVICE)
    _check_against_oracle(zs, zt, zr, y, (1.0, 1.0, 1.0), 1.25, None, seed=7)


def test_strided_rows_and_in_place_backward():
    """Column-sliced (padded) teacher / reference rows; out aliasing zs gives the fresh-out gradient."""
    zs, zt, zr, y = make_problem(5, 37, seed=3, dtype=torch.float32, pad=11, device=DEVICE)
    zt, zr = zt[:, :37], zr[:, :37]
    assert zt.stride(0) == 48 and not zt.is_contiguous()
    temps, lam = (1.0, 1.0, 1.0), 0.5
    stats = triton_backend.rows_forward(zs, zt, zr, y, *temps, IGNORE)
    expect = torch_backend.rows_forward(zs, zt.contiguous(), zr.contiguous(), y, *temps, IGNORE)
    torch.testing.assert_close(stats, expect, rtol=1e-5, atol=1e-5)
    g_lp, g_loss = torch.randn(5, device=DEVICE), torch.randn(5, device=DEVICE)
    fresh = triton_backend.rows_backward(zs, zt, zr, y, stats, g_lp, g_loss, lam, *temps, IGNORE,
                                         torch.empty_like(zs))
    inplace = zs.clone()
    back = triton_backend.rows_backward(inplace, zt, zr, y, stats, g_lp, g_loss, lam, *temps, IGNORE, inplace)
    assert back.data_ptr() == inplace.data_ptr()
    torch.testing.assert_close(inplace, fresh, rtol=0, atol=0)


def test_all_rows_masked_and_empty_batch():
    zs, zt, zr, y = make_problem(3, 17, seed=1, dtype=torch.float32, device=DEVICE)
    y[:] = IGNORE
    stats = triton_backend.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGNORE)
    assert torch.all(stats == 0)
    out = torch.full_like(zs, 7.0)
    ones = torch.ones(3, device=DEVICE)
    triton_backend.rows_backward(zs, zt, zr, y, stats, ones, ones, 1.25, 1.0, 1.0, 1.0, IGNORE, out)
    assert torch.all(out == 0)
    empty = torch.empty(0, 17, device=DEVICE)
    assert triton_backend.rows_forward(empty, None, None, torch.empty(0, dtype=torch.int64, device=DEVICE),
                                       1.0, 1.0, 1.0, IGNORE).shape == (NSTATS, 0)


def test_zero_coefficients_never_multiply_infinite_logs():
    """lam = 0 with a teacher that is -inf where the student has mass; g_loss = 0 rows: no NaN."""
    zs, zt, zr, y = make_problem(4, 33, seed=5, dtype=torch.float32, mask_frac=0.0, device=DEVICE)
    zt[:, 5] = float("-inf")
    stats = triton_backend.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGNORE)
    assert torch.all(torch.isneginf(stats[E_T]))  # E_ps[log p_t] really is -inf here
    g = torch.randn(4, device=DEVICE)
    out = triton_backend.rows_backward(zs, zt, zr, y, stats, g, g, 0.0, 1.0, 1.0, 1.0, IGNORE,
                                       torch.empty_like(zs))
    assert torch.isfinite(out).all()
    out = triton_backend.rows_backward(zs, zt, zr, y, stats, g, torch.zeros(4, device=DEVICE), 1.25, 1.0, 1.0,
                                       1.0, IGNORE, torch.empty_like(zs))
    assert torch.isfinite(out).all()
    # lam = 1: the reference's coefficient 1 - lam is 0, so a -inf reference column must not matter.
    zt[:, 5] = zs[:, 5]
    zr_inf = zr.clone()
    zr_inf[:, 7] = float("-inf")
    grads = []
    for r in (zr, zr_inf):
        st_r = triton_backend.rows_forward(zs, zt, r, y, 1.0, 1.0, 1.0, IGNORE)
        grads.append(triton_backend.rows_backward(zs, zt, r, y, st_r, g, g, 1.0, 1.0, 1.0, 1.0, IGNORE,
                                                  torch.empty_like(zs)))
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1], grads[0])


def test_available_and_clear_errors():
    ok, why = triton_backend.available()
    assert ok, why
    zs, zt, zr, y = make_problem(2, 9, seed=0, dtype=torch.float32, device=DEVICE)
    with pytest.raises(TypeError, match="int32"):  # the backend checks its declared DTYPES
        triton_backend.rows_forward(zs.to(torch.int32), None, None, y, 1.0, 1.0, 1.0, IGNORE)
    with pytest.raises(ValueError, match="stride"):
        triton_backend.rows_forward(zs.t().contiguous().t(), None, None, y, 1.0, 1.0, 1.0, IGNORE)
    if ON_GPU:
        with pytest.raises(ValueError, match="zt is on"):
            triton_backend.rows_forward(zs, zt.cpu(), None, y, 1.0, 1.0, 1.0, IGNORE)


@pytest.mark.parametrize("mode", ["sampled", "full"])
@pytest.mark.parametrize("lam,with_ref", [(1.0, False), (1.25, True), (0.0, True)])
def test_public_api_with_triton_matches_the_reference(mode, lam, with_ref):
    zs, zt, zr, y = make_problem(6, 129, seed=11, dtype=torch.float32, scale=4.0, inf_cols=2, device=DEVICE)
    zr = zr if with_ref else None
    temperature = (0.8, 1.0, 1.2)
    outs, grads = [], []
    for fn, kw in ((gk.gopd_loss, dict(backend="triton")), (R.gopd_loss, {})):
        z = zs.clone().requires_grad_(True)
        out = fn(z, y, zt, zr, lam=lam, mode=mode, temperature=temperature, reduction="none", **kw)
        (g,) = torch.autograd.grad((out.loss * torch.linspace(-1, 2, 6, device=DEVICE)).sum(), z)
        outs.append(out)
        grads.append(g)
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=1e-5, atol=1e-5)
    for name in ("lp_s", "lp_t", "reward", "kl"):
        a, b = getattr(outs[0], name, None), getattr(outs[1], name, None)
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


_COMPILE_SCRIPT = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gopd_kernels.triton import rows as K
common = {"V": "i32", "stride_s": "i32", "stride_t": "i32", "stride_r": "i32", "params_ptr": "*fp64",
          "ignore_index": "i32", "HAS_T": "constexpr", "HAS_R": "constexpr", "ACC": "constexpr",
          "BLOCK_V": "constexpr"}
for has_t, has_r in ((True, True), (False, False)):
    fwd = dict(zs_ptr="*bf16", zt_ptr="*bf16", zr_ptr="*bf16", y_ptr="*i64", stats_ptr="*fp64",
               stride_stat="i32", **common)
    bwd = dict(zs_ptr="*bf16", zt_ptr="*bf16", zr_ptr="*bf16", y_ptr="*i64", stats_ptr="*fp64",
               glp_ptr="*fp64", gloss_ptr="*fp64", out_ptr="*bf16", stride_o="i32", stride_stat="i32", **common)
    for kernel, sig, block in ((K._rows_forward_kernel, fwd, K._FWD_BLOCK), (K._rows_backward_kernel, bwd, K._BWD_BLOCK)):
        const = {"HAS_T": has_t, "HAS_R": has_r, "ACC": tl.float32, "BLOCK_V": block}
        order = list(kernel.arg_names)
        sig = {name: sig[name] for name in order}
        k = triton.compile(ASTSource(kernel, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": K._forward_warps(block) if kernel is K._rows_forward_kernel
                                    else K._block_and_warps(1 << 20, block)[1]})
        assert "ptx" in k.asm
print("compiled")
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels are compiled and run natively by the other tests")
def test_kernels_compile_for_an_h100_without_a_gpu():
    """The interpreter accepts code the compiler rejects (e.g. non-constexpr globals): compile to PTX
    for sm_90 in a subprocess without TRITON_INTERPRET (no GPU needed for code generation)."""
    import subprocess

    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 and ("GPUTarget" in proc.stderr and "ImportError" in proc.stderr):
        pytest.skip("this triton version has no ahead-of-time compile API")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled" in proc.stdout


@pytest.mark.parametrize("mode,lam", [("full", 1.25), ("sampled", 0.5)])
def test_fused_linear_with_triton_matches_the_reference(mode, lam):
    """fused_linear_gopd_loss(backend="triton") in chunks vs the reference on materialised logits."""
    g = torch.Generator().manual_seed(21)
    n, d, v = 10, 16, 129
    hs, ht, hr = (torch.randn(n, d, generator=g).to(DEVICE) for _ in range(3))
    ws, wt, wr = (torch.randn(v, d, generator=g).to(DEVICE) * 0.7 for _ in range(3))
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    y[3] = IGNORE
    grads = []
    for fused in (True, False):
        h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        if fused:
            loss = gk.fused_linear_gopd_loss(h, w, y, ht, wt, hr, wr, lam=lam, mode=mode, backend="triton",
                                             chunk_size=4).loss
        else:
            loss = R.gopd_loss(h @ w.T, y, ht @ wt.T, hr @ wr.T, lam=lam, mode=mode).loss
        grads.append((loss.detach(),) + torch.autograd.grad(loss, (h, w)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_v", [16, 64])
@pytest.mark.parametrize("who", ["teacher", "reference"])
def test_a_minus_inf_expectation_survives_a_jump_of_the_student_max(block_v, who):
    """A teacher (reference) -inf where the student has weight makes A_t (A_r) -inf; when the student's
    running max later jumps by more than ~104, the old sums are scaled by exp(-huge) = 0, and
    -inf * 0 must not become NaN: the old mass is now negligible, as in the torch backend."""
    n, v = 2, 64
    zs = torch.zeros(n, v)
    zs[:, :32] = -200.0
    zt, zr = torch.randn(n, v, generator=torch.Generator().manual_seed(4)), torch.zeros(n, v)
    (zt if who == "teacher" else zr)[0, 3] = float("-inf")
    y = torch.tensor([40, 50])
    args = [z.to(DEVICE) for z in (zs, zt, zr)] + [y.to(DEVICE)]
    ours = K.rows_forward(*args, 1.0, 1.0, 1.0, IGNORE, block_v=block_v).cpu()
    want = torch_backend.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, IGNORE)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(ours.double(), want.double(), rtol=1e-5, atol=1e-5)
