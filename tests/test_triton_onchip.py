"""backend="triton", impl="onchip" (gopd_kernels/triton/onchip.py, logit tiles kept on chip) against the reference.

Runs natively on a CUDA GPU; without one, on CPU tensors under Triton's interpreter (slow: small
shapes and few examples). The interpreter tests use 16-wide tiles so that ragged N, V and D cross
several tiles in every direction. fp64 is held to the fp64 reference tightly; fp32 is judged the
Cut-Cross-Entropy way (tests/helpers.py): its error against fp64 may exceed plain fp32 torch's by a factor.
"""

import os
import sys

import pytest
import torch

from helpers import assert_close_as_torch, triton_device

triton, DEVICE = triton_device()
ON_GPU = DEVICE == "cuda"

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import gopd_kernels as gk  # noqa: E402
from gopd_kernels import backends  # noqa: E402
from gopd_kernels import reference as R  # noqa: E402
from gopd_kernels.backends import torch as torch_backend  # noqa: E402
from gopd_kernels.triton import onchip as K  # noqa: E402

# The interpreter evaluates both sides of every tl.where (0 * -inf in masked columns): discarded by design.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

IGNORE = -100
SMALL = dict(block_n=16, block_v=16, block_d=16)
DIAGNOSTICS = ("lp_s", "lp_t", "lp_r", "reward", "kl", "advantage", "entropy")


@pytest.fixture(autouse=True, scope="module")
def small_tiles():
    """Small tiles keep the interpreter fast; no tuning table, whose tiles for a listed GPU would win."""
    saved, table = dict(K.BLOCKS), os.environ.get("GOPD_TUNING_TABLE")
    K.BLOCKS.update(SMALL)
    os.environ["GOPD_TUNING_TABLE"] = "none"
    yield
    K.BLOCKS.clear()
    K.BLOCKS.update(saved)
    if table is None:
        os.environ.pop("GOPD_TUNING_TABLE", None)
    else:
        os.environ["GOPD_TUNING_TABLE"] = table


def _problem(seed, n, v, dims, pad, mask_frac):
    """Hidden states / weights in fp64 (the truth's inputs), each head its own D; teacher / ref padded."""
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(n, d, generator=g, dtype=torch.float64) for d in dims]
    ws = [torch.randn(v + (pad if i else 0), d, generator=g, dtype=torch.float64) * (2.0 / d ** 0.5)
          for i, d in enumerate(dims)]
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < mask_frac] = IGNORE
    return hs, ws, y


def _run(which, hs, ws, y, *, has_r, mode, lam, temps, reduction, dtype):
    """(loss, diagnostics, dH_s, dW_s) of one implementation; `which` in {"onchip", "reference"}."""
    h = [x.to(dtype).to(DEVICE) for x in hs]
    w = [x.to(dtype).to(DEVICE) for x in ws]
    h[0].requires_grad_(True)
    w[0].requires_grad_(True)
    yy = y.to(DEVICE)
    hr, wr = (h[2], w[2]) if has_r else (None, None)
    kw = dict(lam=lam, mode=mode, temperature=temps, reduction=reduction)
    if which == "onchip":
        out = gk.fused_linear_gopd_loss(h[0], w[0], yy, h[1], w[1], hr, wr, backend="triton", impl="onchip", **kw)
    else:  # plain torch on materialised logits in `dtype`
        v = w[0].shape[0]
        out = R.gopd_loss(h[0] @ w[0].T, yy, h[1] @ w[1][:v].T, None if hr is None else hr @ wr[:v].T, **kw)
    g = torch.Generator().manual_seed(7)
    up = torch.randn(out.loss.shape, generator=g, dtype=torch.float64).to(out.loss)  # "none": any upstream
    dh, dw = torch.autograd.grad((out.loss * up).sum(), (h[0], w[0]))
    diags = {k: getattr(out, k) for k in DIAGNOSTICS if getattr(out, k) is not None}
    return out.loss.detach(), diags, dh, dw


@settings(max_examples=16)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 37), v=st.integers(2, 45),
       dims=st.tuples(st.integers(1, 35), st.integers(1, 35), st.integers(1, 35)),
       pad=st.sampled_from([0, 3]), mode=st.sampled_from(["full", "sampled"]), lam=st.sampled_from([0.0, 1.0, 1.25]),
       temps=st.sampled_from([1.0, (0.7, 1.3, 1.1)]), reduction=st.sampled_from(["mean", "sum", "none"]),
       has_r=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]))
def test_matches_the_float64_reference(seed, n, v, dims, pad, mode, lam, temps, reduction, has_r, dtype):
    """Loss, diagnostics and the gradients of H_s and W_s: ragged N, V and D (not multiples of the tiles),
    a teacher / reference of other hidden sizes and padded vocabularies, masks, temperatures, both modes."""
    has_r = has_r or lam != 1.0  # lam != 1 needs a reference
    hs, ws, y = _problem(seed, n, v, dims, pad, mask_frac=0.25)
    # The float64 truth is taken on the inputs as rounded to `dtype`: input rounding is not the kernel's error.
    hs, ws = ([x.to(dtype).double() for x in xs] for xs in (hs, ws))
    args = dict(has_r=has_r, mode=mode, lam=lam, temps=temps, reduction=reduction)
    truth = _run("reference", hs, ws, y, dtype=torch.float64, **args)
    ours = _run("onchip", hs, ws, y, dtype=dtype, **args)
    assert set(ours[1]) == set(truth[1])
    if dtype == torch.float64:
        def close(a, b, what):
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-9, atol=1e-10, msg=what)
    else:
        same = _run("reference", hs, ws, y, dtype=dtype, **args)  # plain torch in `dtype`: its own error

        def close(a, b, what):
            assert_close_as_torch(a.cpu(), same_of[what].cpu(), b.cpu(), what=what)

        same_of = dict(loss=same[0], dh=same[2], dw=same[3], **same[1])
    close(ours[0], truth[0], "loss")
    for k in truth[1]:
        close(ours[1][k], truth[1][k], k)
    close(ours[2], truth[2], "dh")
    close(ours[3], truth[3], "dw")


def test_statistics_and_target_logits_match_the_row_backend():
    """The kernel's [9, N] statistics equal the row contract's on materialised logits, its target logits
    are z(y) / T, and masked rows are 0 everywhere; default (GPU) tile sizes, V across two tiles."""
    hs, ws, y = _problem(3, 70, 150, (40, 24, 72), 5, mask_frac=0.2)
    temps = (0.9, 1.1, 1.3)
    h = [x.to(DEVICE) for x in hs]
    w = [x.to(DEVICE) for x in ws]
    stats, zy = K.onchip_forward(h[0], w[0], h[1], w[1], h[2], w[2], y.to(DEVICE), *temps, IGNORE, vocab=150,
                                 blocks=dict(block_n=64, block_v=128, block_d=64))
    z = [hs[i] @ ws[i][:150].T for i in range(3)]
    want = torch_backend.rows_forward(*z, y, *temps, IGNORE)
    torch.testing.assert_close(stats.cpu(), want, rtol=1e-10, atol=1e-10)
    valid = y != IGNORE
    for i, t in enumerate(temps):
        expect = torch.where(valid, z[i].gather(1, y.clamp(min=0)[:, None])[:, 0] / t, 0.0)
        torch.testing.assert_close(zy[i].cpu(), expect, rtol=1e-12, atol=1e-12)
    assert (stats[:, ~valid.to(DEVICE)] == 0).all()


def test_logprobs_and_mixed_dtypes():
    """fused_linear_logprobs takes the backend too; a bf16 hidden beside an fp32 head is up-cast (never
    rounded down) and its gradient comes back in bf16."""
    hs, ws, y = _problem(5, 19, 33, (20, 20, 20), 0, mask_frac=0.2)
    h, w = hs[0].to(DEVICE).float(), ws[0].to(DEVICE).float()
    ours = gk.fused_linear_logprobs(h, w, y.to(DEVICE), 0.8, backend="triton", impl="onchip")
    want = gk.fused_linear_logprobs(h, w, y.to(DEVICE), 0.8, backend="torch")
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    hb = h.bfloat16().requires_grad_(True)
    wt, ht = ws[1].to(DEVICE).float(), hs[1].to(DEVICE).float()
    outs = [gk.fused_linear_gopd_loss(hb, w, y.to(DEVICE), ht, wt, mode="full", **kw).loss
            for kw in (dict(backend="triton", impl="onchip"), dict(backend="torch"))]
    grads = [torch.autograd.grad(o, hb)[0] for o in outs]
    assert grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0].float(), grads[1].float(), rtol=1e-2, atol=1e-3)


def test_clear_errors_and_auto_never_picks_it():
    hs, ws, y = _problem(1, 4, 10, (8, 8, 8), 0, mask_frac=0.0)
    h, w, yy = hs[0].to(DEVICE), ws[0].to(DEVICE), y.to(DEVICE)
    bias = torch.zeros(10, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="student_bias"):
        gk.fused_linear_gopd_loss(h, w, yy, h, w, student_bias=bias, backend="triton", impl="onchip")
    with pytest.raises(ValueError, match="mode"):
        gk.fused_linear_gopd_loss(h, w, yy, teacher_topk_ids=y[:, None].clamp(min=0),
                                  teacher_topk_logprobs=torch.zeros(4, 1, dtype=torch.float64), mode="topk",
                                  backend="triton", impl="onchip")
    with pytest.raises(ValueError, match="fused-linear"):
        gk.gopd_loss(h @ w.T, yy, h @ w.T, backend="triton_onchip")
    for device in ("cpu", "cuda"):  # the on-chip kernels are an implementation, never a backend auto picks
        assert backends.resolve("auto", torch.device(device)) in backends.BACKENDS


def test_backend_triton_onchip_is_the_deprecated_spelling_of_impl_onchip():
    hs, ws, y = _problem(1, 4, 10, (8, 8, 8), 0, mask_frac=0.0)
    h, w, yy = hs[0].to(DEVICE), ws[0].to(DEVICE), y.to(DEVICE)
    with pytest.warns(DeprecationWarning, match="impl='onchip'"):
        old = gk.fused_linear_gopd_loss(h, w, yy, h, w, mode="full", backend="triton_onchip").loss
    new = gk.fused_linear_gopd_loss(h, w, yy, h, w, mode="full", backend="triton", impl="onchip").loss
    assert torch.equal(old, new)


_COMPILE_SCRIPT = r"""
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gopd_kernels.triton import onchip as K
heads = ("hs_ptr", "ws_ptr", "ht_ptr", "wt_ptr", "hr_ptr", "wr_ptr")
ints = ["N", "V", "D_s", "D_t", "D_r"] + [f"{m}_{x}" for m in "str" for x in ("hn", "hd", "wv", "wd")]
fwd = dict(y_ptr="*i64", stats_ptr="*fp64", zy_ptr="*fp32", stride_stat="i32")
bwd = dict(y_ptr="*i64", stats_ptr="*fp64", glp_ptr="*fp64", gloss_ptr="*fp64", dh_ptr="*fp32", dw_ptr="*fp32",
           stride_stat="i32", stride_dhn="i32", stride_dwv="i32")
for kernel, extra, flags in ((K._onchip_forward_kernel, fwd, ("HAS_T", "HAS_R")),
                             (K._onchip_backward_kernel, bwd, ("USE_T", "USE_R"))):
    sig = {h: "*bf16" for h in heads}
    sig.update({i: "i32" for i in ints}, params_ptr="*fp64", ignore_index="i32", **extra)
    const = {flags[0]: True, flags[1]: True, "ACC": tl.float32, "BLOCK_N": K.BLOCKS["block_n"],
             "BLOCK_V": K.BLOCKS["block_v"], "BLOCK_D": K.BLOCKS["block_d"], "DOT_F32": False}
    sig.update({c: "constexpr" for c in const})
    sig = {name: sig[name] for name in kernel.arg_names}
    k = triton.compile(ASTSource(kernel, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": K._WARPS, "enable_fp_fusion": False})
    assert "ptx" in k.asm
    # An H100 block may use at most 227 KiB of shared memory: more fails only at launch, on the GPU.
    assert k.metadata.shared <= 227 * 1024, (kernel.__name__, k.metadata.shared)
    print(kernel.__name__, "shared bytes", k.metadata.shared, "cubin" in k.asm)
print("compiled")
"""


@pytest.mark.skipif(ON_GPU, reason="on a GPU the kernels are compiled and run natively by the other tests")
def test_kernels_compile_for_an_h100_without_a_gpu():
    """The interpreter accepts code the compiler rejects: compile both kernels (bf16 heads, the GPU's
    tile sizes) to PTX for sm_90 in a subprocess without TRITON_INTERPRET."""
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
