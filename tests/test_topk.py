"""mode="topk": both ops against the reference (loss, diagnostics, student gradients) on ragged
shapes, k = V equals mode="full", the teacher-tail rule, and the input errors."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gopd_kernels as gk
from gopd_kernels import reference
from gopd_kernels.topk import TAIL_FLOOR


def problem(n, v, k, seed, *, ref=True, pad=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    zt = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    zr = torch.randn(n, v + pad, generator=g, dtype=torch.float64) * 3 if ref else None
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.2] = -100
    top = zt.log_softmax(-1).topk(k)
    cast = (lambda x: None if x is None else x.to(dtype))
    return cast(zs), cast(zr), y, top.indices, cast(top.values), zt


def compare(out, expected, atol):
    for name in ("loss", "lp_s", "lp_r", "reward", "kl", "entropy", "is_weight"):
        torch.testing.assert_close(getattr(out, name).double(), getattr(expected, name).double(), atol=atol,
                                   rtol=atol, msg=name)
    assert out.lp_t is None and out.advantage is None


@given(n=st.integers(1, 9), v=st.integers(2, 13), k_frac=st.floats(0, 1), seed=st.integers(0, 2**16),
       lam=st.sampled_from([1.0, 1.25, 0.5, 0.0]), ts=st.sampled_from([1.0, 0.7]), tr=st.sampled_from([1.0, 1.4]),
       reduction=st.sampled_from(["mean", "sum", "none"]), rollout=st.booleans())
def test_gopd_loss_topk_matches_reference(n, v, k_frac, seed, lam, ts, tr, reduction, rollout):
    k = 1 + int(k_frac * (v - 1))
    zs, zr, y, ids, lps, _ = problem(n, v, k, seed, ref=lam != 1.0 or seed % 2 == 0, pad=seed % 3)
    kw = dict(lam=lam, mode="topk", teacher_topk_ids=ids, teacher_topk_logprobs=lps, temperature=(ts, 1.0, tr),
              reduction=reduction, rollout_logprobs=torch.randn(n, dtype=torch.float64) - 2 if rollout else None)
    a, b = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    out = gk.gopd_loss(a, y, None, zr, **kw)
    exp = reference.gopd_loss(b, y, None, zr, **kw)
    compare(out, exp, 1e-10)
    up = torch.randn(out.loss.shape, dtype=torch.float64)
    (out.loss * up).sum().backward()
    (exp.loss * up).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-10)


@given(n=st.integers(1, 9), v=st.integers(2, 13), d=st.integers(1, 6), k_frac=st.floats(0, 1),
       seed=st.integers(0, 2**16), chunk=st.integers(1, 5), bias=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_fused_linear_topk_matches_reference(n, v, d, k_frac, seed, chunk, bias, reduction):
    k = 1 + int(k_frac * (v - 1))
    g = torch.Generator().manual_seed(seed)
    _, _, y, ids, lps, _ = problem(n, v, k, seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    hr = torch.randn(n, d + 1, generator=g, dtype=torch.float64)
    wr = torch.randn(v + 2, d + 1, generator=g, dtype=torch.float64)   # a padded reference head
    leaves = [x.clone().requires_grad_() for x in (h, w) + ((b,) if bias else ())]
    out = gk.fused_linear_gopd_loss(leaves[0], leaves[1], y, ref_hidden=hr, ref_weight=wr,
                                    student_bias=leaves[2] if bias else None, lam=1.25, mode="topk",
                                    teacher_topk_ids=ids, teacher_topk_logprobs=lps, chunk_size=chunk,
                                    reduction=reduction)
    leaves2 = [x.clone().requires_grad_() for x in (h, w) + ((b,) if bias else ())]
    z = leaves2[0] @ leaves2[1].t() + (leaves2[2] if bias else 0)
    exp = reference.gopd_loss(z, y, None, hr @ wr.t(), lam=1.25, mode="topk", teacher_topk_ids=ids,
                              teacher_topk_logprobs=lps, reduction=reduction)
    compare(out, exp, 1e-10)
    up = torch.randn(out.loss.shape, dtype=torch.float64)
    g1 = torch.autograd.grad((out.loss * up).sum(), leaves)
    g2 = torch.autograd.grad((exp.loss * up).sum(), leaves2)
    for x1, x2 in zip(g1, g2):
        torch.testing.assert_close(x1, x2, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("lam", [1.0, 1.25])
def test_k_equal_v_is_full_mode(lam):
    zs, zr, y, ids, lps, zt = problem(12, 17, 17, 3)
    a, b = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    top = gk.gopd_loss(a, y, None, zr, lam=lam, mode="topk", teacher_topk_ids=ids, teacher_topk_logprobs=lps)
    full = gk.gopd_loss(b, y, zt, zr, lam=lam, mode="full")
    for name in ("loss", "reward", "kl", "entropy"):
        torch.testing.assert_close(getattr(top, name), getattr(full, name), atol=1e-12, rtol=1e-12, msg=name)
    top.loss.backward()
    full.loss.backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12)
    # ... and in the reference.
    r = reference.gopd_loss(zs, y, None, zr, lam=lam, mode="topk", teacher_topk_ids=ids, teacher_topk_logprobs=lps)
    torch.testing.assert_close(r.loss, full.loss, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_teacher_tail_rounding_to_zero_is_floored(dtype):
    """A teacher that puts all its mass on its k ids: the tail's log-prob is log TAIL_FLOOR, finite."""
    zs, zr, y, ids, _, zt = problem(6, 9, 3, 5, dtype=dtype)
    lps = zt.gather(1, ids).log_softmax(-1).sort(-1, descending=True)
    ids = ids.gather(1, lps.indices)
    lps = lps.values.to(dtype)
    a = zs.clone().requires_grad_()
    out = gk.gopd_loss(a, y, None, zr, lam=1.25, mode="topk", teacher_topk_ids=ids, teacher_topk_logprobs=lps,
                       reduction="none")
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(a.grad).all()
    # The rule, by hand: buckets = the 3 ids + the tail, teacher tail = TAIL_FLOOR.
    ls, lr = zs.double().log_softmax(-1), zr.double().log_softmax(-1)
    for i in range(6):
        if y[i] < 0:
            continue
        mask = torch.ones(9, dtype=torch.bool)
        mask[ids[i]] = False
        s = torch.cat([ls[i, ids[i]], ls[i, mask].logsumexp(0, keepdim=True)])
        r = torch.cat([lr[i, ids[i]], lr[i, mask].logsumexp(0, keepdim=True)])
        t = torch.cat([lps[i].double(), torch.tensor([math.log(TAIL_FLOOR)], dtype=torch.float64)])
        want = (s.exp() * (s - 1.25 * t + 0.25 * r)).sum()
        assert abs(float(out.loss[i].detach()) - float(want)) < (1e-4 if dtype == torch.float32 else 1e-10)


def test_fp32_fused_close_to_fp64_reference():
    _, _, y, ids, lps, _ = problem(40, 50, 7, 9)
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(40, 8, generator=g), torch.randn(50, 8, generator=g)
    out = gk.fused_linear_gopd_loss(h, w, y, mode="topk", teacher_topk_ids=ids, teacher_topk_logprobs=lps.float(),
                                    chunk_size=16)
    exp = reference.gopd_loss((h @ w.t()).double(), y, mode="topk", teacher_topk_ids=ids, teacher_topk_logprobs=lps)
    assert out.loss.dtype == torch.float32
    assert abs(float(out.loss) - float(exp.loss)) < 1e-4


def _call(**over):
    zs, zr, y, ids, lps, _ = problem(4, 6, 2, 0)   # rows 0 and 2 valid, 1 and 3 masked
    kw = dict(student_logits=zs, targets=y, ref_logits=zr, lam=1.25, mode="topk", teacher_topk_ids=ids,
              teacher_topk_logprobs=lps)
    kw.update(over)
    return gk.gopd_loss(**kw)


def _lps_with(i, j, value):
    _, _, _, _, lps, _ = problem(4, 6, 2, 0)
    lps = lps.clone()
    lps[i, j] = value
    return lps


def _ids_with(i, j, value):
    _, _, _, ids, _, _ = problem(4, 6, 2, 0)
    ids = ids.clone()
    ids[i, j] = value
    return ids


@pytest.mark.parametrize("over,message", [
    (dict(teacher_topk_ids=_ids_with(0, 1, 6)), r"teacher_topk_ids: id 6 is outside the vocabulary \[0, 6\)"),
    (dict(teacher_topk_ids=_ids_with(2, 0, -3)), "id -3 is outside"),
    (dict(teacher_topk_ids=torch.zeros(4, 2, dtype=torch.long)), "an id appears twice"),
    (dict(teacher_topk_ids=torch.zeros(4, 3, dtype=torch.long)), "must have the same shape"),
    (dict(teacher_topk_ids=torch.zeros(5, 2, dtype=torch.long)), r"teacher_topk_ids: expected shape \(4,\) \+ \(k,\)"),
    (dict(teacher_topk_ids=torch.arange(7).expand(4, 7), teacher_topk_logprobs=torch.full((4, 7), -3.0,
                                                                                          dtype=torch.float64)),
     r"k = 7 must be in \[1, V = 6\]"),
    (dict(teacher_topk_logprobs=_lps_with(2, 1, 0.5)), "must be <= 0"),
    (dict(teacher_topk_logprobs=_lps_with(2, 1, -0.01)), "sorted in descending order"),
    (dict(teacher_topk_logprobs=_lps_with(2, 1, float("nan"))), "teacher_topk_logprobs: NaN"),
    (dict(teacher_topk_logprobs=torch.full((4, 2), -0.1, dtype=torch.float64)), "sum to"),
    (dict(teacher_topk_ids=None), "needs teacher_topk_ids and teacher_topk_logprobs"),
    (dict(teacher_topk_ids=torch.zeros(4, 2)), "teacher_topk_ids"),
    (dict(teacher_logits=torch.zeros(4, 6)), r"\['teacher_logits'\] cannot be used"),
    (dict(ref_logits=None), "lam=1.25 needs a reference"),
    (dict(mode="sampled", teacher_logits=torch.zeros(4, 6)), "are for mode='topk', not mode='sampled'"),
])
def test_topk_errors_name_the_argument(over, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _call(**over)


def test_masked_rows_may_hold_anything():
    zs, zr, y, ids, lps, _ = problem(5, 6, 2, 4)
    y[1] = -100
    ids2, lps2 = ids.clone(), lps.clone()
    ids2[1] = torch.tensor([0, 0])        # padding rows: duplicates, positive log-probs, all ignored
    lps2[1] = torch.tensor([3.0, 7.0])
    a = gk.gopd_loss(zs, y, None, zr, lam=1.25, mode="topk", teacher_topk_ids=ids, teacher_topk_logprobs=lps)
    b = gk.gopd_loss(zs, y, None, zr, lam=1.25, mode="topk", teacher_topk_ids=ids2, teacher_topk_logprobs=lps2)
    torch.testing.assert_close(a.loss, b.loss, atol=0, rtol=0)
