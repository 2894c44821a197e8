"""Every available backend, end to end through the public API, against gopd_kernels.reference.

float64 is judged tightly; float32 / bfloat16 / float16 the Cut-Cross-Entropy way: our error against
the float64 truth may not exceed plain torch's error on the same low-precision inputs by more than a
small factor.
"""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import gopd_kernels as gk
from gopd_kernels import backends
from gopd_kernels import reference as R

from helpers import (
    BACKENDS,
    LOW_PRECISION,
    assert_close_as_torch,
    backend_dtype_cases,
    device_for,
    interpreted,
    make_problem,
    max_err,
    supports,
    teacher_args,
)

DIAGS = ("lp_s", "lp_t", "lp_r", "reward", "kl", "advantage", "entropy")


def run(fn, zs, y, zt, zr, **kw):
    zs = zs.detach().clone().requires_grad_(True)
    out = fn(zs, y, zt, zr, **kw)
    upstream = torch.linspace(-1, 2, y.numel(), dtype=torch.float64).view(y.shape)
    loss = (out.loss * upstream.to(out.loss)).sum() if kw.get("reduction") == "none" else out.loss
    (g,) = torch.autograd.grad(loss, zs)
    return out, g


problem = dict(
    n=st.sampled_from([1, 7, 33]),
    v=st.sampled_from([1, 7, 129, 3001]),
    lam=st.sampled_from([0.0, 0.5, 1.0, 1.25, 3.0]),
    mode=st.sampled_from(gk.MODES),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    scale=st.sampled_from([1.0, 30.0, 1e4]),
    inf_cols=st.sampled_from([0, 3]),
    pad=st.sampled_from([0, 5]),
    temps=st.sampled_from([1.0, (0.7, 1.0, 1.5)]),
    seed=st.integers(0, 1000),
)


@pytest.mark.parametrize("backend,dtype", backend_dtype_cases([torch.float64]))
@given(**problem)
@settings(max_examples=20)
def test_float64_matches_reference(backend, dtype, n, v, lam, mode, reduction, scale, inf_cols, pad, temps, seed):
    if interpreted(backend) and v > 129:
        v = 129  # the interpreter is slow; large V is covered on a GPU
    zs, zt, zr, y = make_problem(n, v, seed=seed, scale=scale, inf_cols=inf_cols, pad=pad,
                                 device=device_for(backend))
    zt, topk = teacher_args(mode, zt, v)
    kw = dict(lam=lam, mode=mode, reduction=reduction, temperature=temps, **topk)
    ours, g = run(gk.gopd_loss, zs, y, zt, zr, backend=backend, **kw)
    ref, g_ref = run(R.gopd_loss, zs, y, zt, zr, **kw)
    tol = 1e-9 * (1 + float(ref.loss.abs().max()))
    assert max_err(ours.loss, ref.loss) <= tol
    assert max_err(g, g_ref) <= 1e-9 * (1 + float(g_ref.abs().max()))
    for name in DIAGS:
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert max_err(a, b) <= 1e-9 * (1 + float(b.abs().max())), name


@pytest.mark.parametrize("backend,dtype", [(b, d) for b, d in backend_dtype_cases(LOW_PRECISION)
                                           if b != "torch" or d == torch.float32])  # torch: the fp32 baseline
@given(n=st.sampled_from([3, 17]), v=st.sampled_from([7, 129, 1000]), lam=st.sampled_from([1.0, 1.25, 2.0]),
       mode=st.sampled_from(gk.MODES), seed=st.integers(0, 1000))
# A tail token with p = 0.34: its gradient carries any error of log P(tail), here 1e-5 when that was an fp32
# logsumexp(z / T) minus lse (two numbers of size |z / T|), 12x torch's own fp32 error.
@example(n=3, v=129, lam=2.0, mode="topk", seed=359)
@settings(max_examples=8)
def test_low_precision_error_is_torch_like(backend, dtype, n, v, lam, mode, seed):
    zs, zt, zr, y = make_problem(n, v, seed=seed, scale=4.0, device=device_for(backend))
    low = [z.to(dtype) for z in (zs, zt, zr)]
    topk = teacher_args(mode, low[1].double(), v)[1]
    kw = dict(lam=lam, mode=mode, reduction="none", **topk)
    zt_low = None if mode == "topk" else low[1]
    ours, g = run(gk.gopd_loss, low[0], y, zt_low, low[2], backend=backend, **kw)
    truth, g_truth = run(R.gopd_loss, low[0].double(), y, None if zt_low is None else zt_low.double(),
                         low[2].double(), **kw)
    # Plain torch in that dtype: log-softmax of the low-precision logits, computed in that dtype.
    if dtype == torch.float32:
        base, g_base = run(R.gopd_loss, low[0], y, zt_low, low[2], **kw)
    else:
        base, g_base = _torch_in_dtype(low, y, kw)
    assert_close_as_torch(ours.loss, base.loss, truth.loss, what=f"{backend} {dtype} loss")
    assert_close_as_torch(g, g_base, g_truth, what=f"{backend} {dtype} grad")


def _torch_in_dtype(low, y, kw):
    """The eager-torch baseline for 16-bit inputs: every op in the 16-bit dtype, no up-cast."""
    zs, zt, zr = low
    zs = zs.detach().clone().requires_grad_(True)
    ls, lt, lr = (torch.log_softmax(z, -1) for z in (zs, zt, zr))
    lam, valid = kw["lam"], y != -100
    ys = y.clamp(min=0)[:, None]
    if kw["mode"] == "full":
        per = (ls.exp() * (ls - lam * lt - (1 - lam) * lr)).sum(-1)
    elif kw["mode"] == "topk":  # the k + 1 buckets as the reference forms them, every op in the 16-bit dtype
        ids = kw["teacher_topk_ids"]
        outside = torch.zeros_like(ls, dtype=torch.bool).scatter_(1, ids, True)

        def buckets(logp):
            tail = torch.logsumexp(torch.where(outside, float("-inf"), logp), -1, keepdim=True)
            return torch.cat([logp.gather(1, ids), tail], -1)

        lq = kw["teacher_topk_logprobs"].to(zs.dtype)
        lt_b = torch.cat([lq, torch.log((1 - lq.exp().sum(-1, keepdim=True)).clamp(min=2.0 ** -20))], -1)
        l_s, l_r = buckets(ls), buckets(lr)
        ps = l_s.exp()
        c = l_s - lam * lt_b - (1 - lam) * l_r
        per = torch.where(ps > 0, ps * c, torch.zeros_like(c)).sum(-1)
    else:
        lp = lambda t: t.gather(1, ys).squeeze(1)  # noqa: E731
        adv = (lam * lp(lt) + (1 - lam) * lp(lr) - lp(ls)).detach()
        per = -adv * torch.exp(lp(ls) - lp(ls).detach())
    per = torch.where(valid, per, torch.zeros((), dtype=per.dtype, device=per.device))
    upstream = torch.linspace(-1, 2, y.numel(), dtype=torch.float64).to(per)
    (g,) = torch.autograd.grad((per * upstream).sum(), zs)

    class Out:
        loss = per
    return Out, g


@pytest.mark.parametrize("backend,dtype", backend_dtype_cases([torch.float64, torch.float32]))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("mode,lam", [("sampled", 1.25), ("full", 1.25), ("full", 1.0), ("sampled", 1.0),
                                      ("topk", 1.25), ("topk", 1.0)])
def test_fused_linear_matches_reference(backend, dtype, reduction, mode, lam):
    dev = device_for(backend)
    g = torch.Generator().manual_seed(13)
    n, v, d_s, d_t = 37, 301, 16, 24
    mk = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).to(dtype=dtype, device=dev)  # noqa
    hs, ws, bs = mk(n, d_s), mk(v, d_s), mk(v)
    ht, wt, hr, wr = mk(n, d_t), mk(v + 3, d_t), mk(n, d_s), mk(v, d_s)
    y = torch.randint(0, v, (n,), generator=g).to(dev)
    y[::5] = -100
    rollout = torch.randn(n, generator=g, dtype=torch.float64).to(dtype=dtype, device=dev) - 3
    zt, topk = teacher_args(mode, ht.double() @ wt.double().T, v, k=7)
    if mode == "topk":  # the teacher as its top-k, no teacher head
        ht = wt = None
    kw = dict(lam=lam, mode=mode, reduction=reduction, temperature=(1.0, 0.8, 1.2), rollout_logprobs=rollout, **topk)
    params = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
    out = gk.fused_linear_gopd_loss(params[0], params[1], y, ht, wt, hr, wr, student_bias=params[2],
                                    backend=backend, chunk_size=8, **kw)
    ref_params = [x.detach().double().clone().requires_grad_(True) for x in (hs, ws, bs)]
    ref = R.gopd_loss(ref_params[0] @ ref_params[1].T + ref_params[2], y, zt if mode != "topk" else None,
                      hr.double() @ wr.double().T, **kw)
    up = torch.linspace(-1, 2, n, dtype=torch.float64, device=dev)
    loss = (out.loss * up.to(out.loss.dtype)).sum() if reduction == "none" else out.loss
    ref_loss = (ref.loss * up).sum() if reduction == "none" else ref.loss
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, ref_params)
    rel = 1e-9 if dtype == torch.float64 else 2e-4
    assert max_err(loss, ref_loss) <= rel * (1 + abs(float(ref_loss)))
    for name, a, b in zip(("dh", "dW", "db"), grads, ref_grads):
        assert max_err(a, b) <= rel * (1 + float(b.abs().max())), name
    assert max_err(out.kl, ref.kl) <= rel * (1 + float(ref.kl.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_logprobs(backend):
    dev = device_for(backend)
    dtype = torch.float32 if not supports(backend, torch.float64) else torch.float64
    g = torch.Generator().manual_seed(14)
    h = torch.randn(4, 5, 12, generator=g, dtype=torch.float64).to(dtype=dtype, device=dev).requires_grad_(True)
    w = torch.randn(77, 12, generator=g, dtype=torch.float64).to(dtype=dtype, device=dev).requires_grad_(True)
    y = torch.randint(0, 77, (4, 5), generator=g).to(dev)
    y[0, :2] = -100
    lp = gk.fused_linear_logprobs(h, w, y, temperature=0.9, backend=backend, chunk_size=3)
    full = torch.log_softmax((h @ w.T).double() / 0.9, -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    full = torch.where(y != -100, full, 0.0)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert lp.shape == (4, 5) and max_err(lp, full) <= tol * 10
    gh, gw = torch.autograd.grad(lp.sum(), (h, w))
    gh2, gw2 = torch.autograd.grad(full.sum(), (h, w))
    assert max_err(gh, gh2) <= tol * 10 and max_err(gw, gw2) <= tol * 10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", gk.MODES)
def test_empty_and_all_masked_batches_give_zero_not_nan(backend, mode):
    dev = device_for(backend)
    dtype = torch.float32
    for n, mask_all in ((0, False), (6, True)):
        zs, zt, zr, y = make_problem(n, 11, dtype=dtype, device=dev)
        if mask_all:
            y[:] = -100
        zs.requires_grad_(True)
        zt, topk = teacher_args(mode, zt, 11)
        out = gk.gopd_loss(zs, y, zt, zr, lam=1.25, mode=mode, backend=backend, **topk)
        assert float(out.loss) == 0.0
        (g,) = torch.autograd.grad(out.loss, zs)
        assert g.shape == zs.shape and (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_shape_teacher_logprobs_and_modules(backend):
    dev = device_for(backend)
    zs, zt, zr, y = make_problem(2 * 6, 29, dtype=torch.float32, device=dev)
    zs, zt, zr, y = (x.view(2, 6, *x.shape[1:]) for x in (zs, zt, zr, y))
    from_logits = gk.gopd_loss(zs, y, zt, zr, lam=1.25, reduction="none", backend=backend)
    assert from_logits.loss.shape == (2, 6) and from_logits.kl.shape == (2, 6)
    served = gk.gopd_loss(zs, y, teacher_logprobs=from_logits.lp_t, ref_logprobs=from_logits.lp_r, lam=1.25,
                          reduction="none", backend=backend)
    torch.testing.assert_close(served.loss, from_logits.loss)
    module = gk.GOPDLoss(lam=1.25, reduction="none", backend=backend)
    torch.testing.assert_close(module(zs, y, zt, zr).loss, from_logits.loss)


def test_inplace_backward_reuses_the_logits_storage():
    zs, zt, zr, y = make_problem(5, 17)
    expected = run(gk.gopd_loss, zs, y, zt, zr, lam=1.25, mode="full", backend="torch")[1]
    leaf = zs.clone().requires_grad_(True)
    work = leaf * 1.0  # a non-leaf the caller no longer needs
    out = gk.gopd_loss(work, y, zt, zr, lam=1.25, mode="full", backend="torch", inplace_backward=True)
    (g,) = torch.autograd.grad(out.loss, leaf)
    torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("trainable", ["hidden", "weight"])
def test_fused_linear_with_a_frozen_head_or_frozen_hidden(reduction, trainable):
    """Only the inputs that need a gradient get one (a frozen LM head allocates no dW)."""
    g = torch.Generator().manual_seed(15)
    h, w = torch.randn(9, 8, generator=g, dtype=torch.float64), torch.randn(23, 8, generator=g, dtype=torch.float64)
    ht, wt = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(23, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 23, (9,), generator=g)
    x = (h if trainable == "hidden" else w).clone().requires_grad_(True)
    args = (x, w) if trainable == "hidden" else (h, x)
    out = gk.fused_linear_gopd_loss(*args, y, ht, wt, mode="full", reduction=reduction, backend="torch",
                                    chunk_size=4)
    ref = R.gopd_loss(args[0] @ args[1].T, y, ht @ wt.T, mode="full", reduction=reduction)
    (ga,) = torch.autograd.grad(out.loss.sum(), x)
    (gb,) = torch.autograd.grad(ref.loss.sum(), x)
    assert max_err(ga, gb) <= 1e-10


def test_gradient_accumulator_overwrites_its_uninitialised_buffers():
    """dW / db are allocated empty and the first chunk writes them with beta = 0: garbage (here NaN)
    in the fresh buffers must not reach the result, and no chunk at all must give zeros."""
    from gopd_kernels.autograd import _GradAccumulator

    g = torch.Generator().manual_seed(16)
    n, v, d = 10, 13, 6
    h, w, b = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g), torch.randn(v, generator=g)
    dz = torch.randn(n, v, generator=g)
    acc = _GradAccumulator(h, w, b, True, True, True, torch.float32)
    for buf in (acc.dh, acc.dw, acc.db):
        buf.fill_(float("nan"))
    for rows in (slice(0, 4), slice(4, 8), slice(8, 10)):
        acc.add(dz[rows], h[rows], rows)
    dh, dw, db = acc.result()
    torch.testing.assert_close(dh, dz @ w)
    torch.testing.assert_close(dw, dz.t() @ h)
    torch.testing.assert_close(db, dz.sum(0))
    empty = _GradAccumulator(h[:0], w, b, True, True, True, torch.float32)
    for buf in (empty.dw, empty.db):
        buf.fill_(float("nan"))
    assert all((x == 0).all() for x in empty.result())



def _fused_problem(seed, n=40, v=300, d=16):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return (mk(n, d), mk(v, d), torch.randint(0, v, (n,), generator=g), mk(n, d), mk(v, d), mk(n, d), mk(v, d))


def _fused_step(problem, chunk_size):
    hs, ws, y, ht, wt, hr, wr = problem
    params = [hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)]
    out = gk.fused_linear_gopd_loss(params[0], params[1], y, ht, wt, hr, wr, lam=1.25, mode="full",
                                    backend="cpu", chunk_size=chunk_size)
    return (out.loss.detach(), *torch.autograd.grad(out.loss, params))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ CPU backend is not built")
def test_cpu_workspace_is_reused_bounded_released_and_never_shared():
    """The fused-linear path keeps its [chunk, V] CPU buffers between calls (they would be page-faulted
    in on every call otherwise): results do not depend on what a reused buffer held, the pool stays
    within its capacity, release_workspace() empties it, and concurrent calls do not share buffers."""
    import threading

    from gopd_kernels import _workspace

    gk.release_workspace()
    problems = [_fused_problem(s) for s in range(4)]
    fresh = []
    for p in problems:
        gk.release_workspace()
        fresh.append(_fused_step(p, chunk_size=16))
    assert _workspace.cached_bytes() > 0
    for p, want in zip(reversed(problems), reversed(fresh)):  # reused buffers, other contents
        for a, b in zip(_fused_step(p, chunk_size=16), want):
            assert torch.equal(a, b)
    assert 0 < _workspace.cached_bytes() <= _workspace.CAPACITY_BYTES
    gk.release_workspace()
    assert _workspace.cached_bytes() == 0

    results = [None] * len(problems)
    start = threading.Barrier(len(problems))

    def work(i):
        start.wait()
        results[i] = [_fused_step(problems[i], chunk_size=16) for _ in range(3)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, want in enumerate(fresh):
        for rep in results[i]:
            for a, b in zip(rep, want):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # MKL may split a GEMM differently when busy


def test_workspace_pool_keeps_the_largest_buffers_within_capacity(monkeypatch):
    from gopd_kernels import _workspace

    monkeypatch.setattr(_workspace, "CAPACITY_BYTES", 1000 * 4)
    monkeypatch.setattr(_workspace, "_pool", [])
    bufs = [_workspace.take(n, torch.float32) for n in (100, 600, 300, 200)]
    _workspace.give_back(bufs)
    assert sorted(b.numel() for b in _workspace._pool) == [100, 300, 600]  # 600 + 300 + 100 <= 1000
    got = _workspace.take(250, torch.float32)
    assert got.numel() == 300  # the smallest that fits
    assert _workspace.take(50, torch.float64).dtype == torch.float64  # never a buffer of another dtype


def test_fused_linear_scalar_loss_hands_over_its_gradient_once():
    """The scalar-loss path builds dH / dW in forward; backward hands those tensors to autograd (no [V, D]
    copy: .grad is the very buffer), scales by the upstream gradient, and a second backward through
    the same graph is a clear error rather than a silently wrong gradient."""
    hs, ws, y, ht, wt, hr, wr = _fused_problem(21)
    backend = "cpu" if "cpu" in BACKENDS else "torch"

    def loss(w, h):
        return gk.fused_linear_gopd_loss(h, w, y, ht, wt, hr, wr, lam=1.25, mode="full", backend=backend,
                                         chunk_size=16).loss

    from gopd_kernels import autograd

    built = {}
    result = autograd._GradAccumulator.result

    def spy(self):
        grads = result(self)
        built["dw"] = grads[1].data_ptr()
        return grads

    w1 = ws.clone().requires_grad_(True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autograd._GradAccumulator, "result", spy)
        loss(w1, hs).backward()
    assert w1.grad.data_ptr() == built["dw"]  # adopted, not copied
    w3 = ws.clone().requires_grad_(True)
    (3.0 * loss(w3, hs)).backward()
    torch.testing.assert_close(w3.grad, 3.0 * w1.grad)
    ref_w = ws.double().requires_grad_(True)
    ref = R.gopd_loss(hs.double() @ ref_w.T, y, (ht @ wt.T).double(), (hr @ wr.T).double(), lam=1.25, mode="full")
    ref.loss.backward()
    assert max_err(w1.grad, ref_w.grad) <= 1e-4 * (1 + float(ref_w.grad.abs().max()))

    w2 = ws.clone().requires_grad_(True)
    out = loss(w2, hs)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated once"):
        out.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["full", "sampled"])
def test_nan_logits_give_nan_not_a_finite_loss(backend, mode):
    """A NaN logit in the student's, teacher's or reference's row makes that token's loss and gradient
    NaN, as plain torch's would be; the other rows stay finite. (A `p > 0` mask would turn a NaN p into
    a silently finite 0.)"""
    dev = device_for(backend)
    zs, zt, zr, y = make_problem(5, 41, seed=8, dtype=torch.float32, device=dev)
    y = (torch.arange(5) * 7).to(dev)
    zs[0, 17] = zt[1, 10] = zr[2, 32] = float("nan")
    out, g = run(gk.gopd_loss, zs, y, zt, zr, lam=1.25, mode=mode, reduction="none", backend=backend)
    ref, g_ref = run(R.gopd_loss, zs, y, zt, zr, lam=1.25, mode=mode, reduction="none")
    assert ref.loss[:3].isnan().all() and torch.isfinite(ref.loss[3:]).all()  # what torch does
    assert out.loss[:3].isnan().all(), out.loss
    assert torch.isfinite(out.loss[3:]).all()
    assert torch.equal(g.isnan().any(-1).cpu(), g_ref.isnan().any(-1).cpu()), (g.isnan().sum(-1), g_ref.isnan().sum(-1))


# ---- the CUDA backend's row math through the public API where there is no GPU ----------------------
# "cuda-emulated": the kernels' own row code compiled for the host (tests/cuda_emulation.py), plugged in
# as backend "cuda" for one call, so the tests below judge the CUDA kernels' algebra too.
ALL = BACKENDS + ([] if "cuda" in BACKENDS else ["cuda-emulated"])


@pytest.fixture
def use_backend(request, monkeypatch):
    """use_backend(name) -> (backend argument for the public API, device)."""

    def pick(name):
        if name != "cuda-emulated":
            return name, device_for(name)
        emu = request.getfixturevalue("emulated_cuda")
        real_get, real_resolve = backends.get, backends.resolve
        monkeypatch.setattr(backends, "get", lambda n: emu if n == "cuda" else real_get(n))
        monkeypatch.setattr(backends, "resolve", lambda n, d: "cuda" if n == "cuda" else real_resolve(n, d))
        return "cuda", "cpu"

    return pick


def _offset_problem(near, seed=0):
    """fp64 logits: independent N(0, 2^2) rows (N=4, V=1000), or teacher / reference = student + N(0, 1)
    (N=4, V=129: the rows are near one-hot at large offsets, as a distilled student's are)."""
    g = torch.Generator().manual_seed(seed)
    n, v = (4, 129) if near else (4, 1000)
    zs = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    if near:
        zt = zs + torch.randn(n, v, generator=g, dtype=torch.float64)
        zr = zs + torch.randn(n, v, generator=g, dtype=torch.float64)
    else:
        zt = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
        zr = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    return zs, zt, zr, torch.randint(0, v, (n,), generator=g)


def _relative_grad_error(fn, zs, zt, zr, y, device, **kw):
    """max |g - g_true| / max |g_true| of the student-logit gradient; truth: the reference in fp64 on the
    very same (fp32-rounded) inputs."""
    z64 = zs.double().requires_grad_(True)
    (g_true,) = torch.autograd.grad(R.gopd_loss(z64, y, zt.double(), zr.double(), **kw).loss, z64)
    z = zs.to(device).requires_grad_(True)
    (g,) = torch.autograd.grad(fn(z, y.to(device), zt.to(device), zr.to(device), **kw).loss, z)
    return float((g.cpu().double() - g_true).abs().max() / g_true.abs().max())


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("mode", ["full", "sampled"])
@pytest.mark.parametrize("near", [False, True], ids=["random", "near-student"])
def test_gradient_error_does_not_grow_with_a_logit_offset(use_backend, backend, mode, near):
    """Cut-Cross-Entropy's precision test: adding one constant to every logit leaves the
    exact answer unchanged, so the fp32 gradient's relative error at offsets 30 ... 1e4 must stay at the
    level of plain fp32 torch's own error at offset 0 (4x, as the other low-precision tests allow). An
    fp32 lse of size 1e4 is only good to ~5e-4: a backend that keeps one, and recomputes log-probs as
    z - lse in the backward, had errors 2.7e-5 at 1e3 and 2.4e-4 at 1e4."""
    name, device = use_backend(backend)
    zs0, zt0, zr0, y = _offset_problem(near)
    kw = dict(lam=1.25, mode=mode)
    z32 = [z.float() for z in (zs0, zt0, zr0)]
    base = _relative_grad_error(R.gopd_loss, *z32, y, "cpu", **kw)  # plain fp32 torch at offset 0
    offsets = (-1e4, 1e4) if near else (0.0, 30.0, 100.0, 1e3, 1e4)
    errors = {}
    for off in offsets:
        zs, zt, zr = ((z + off).float() for z in (zs0, zt0, zr0))
        errors[off] = _relative_grad_error(lambda *a, **k: gk.gopd_loss(*a, backend=name, **k), zs, zt, zr, y,
                                           device, **kw)
    assert max(errors.values()) <= 4 * base + 1e-7, f"{backend}: {errors} vs plain fp32 torch's {base:.2g}"


# ---- non-finite inputs: one rule (gopd_kernels.reference's docstring) for every backend ---------------
INF, NAN = float("inf"), float("nan")


def _set(t, row, col, value):
    if col is None:  # a per-token input
        t[row] = value
    else:
        t[row, col] = value


# name: (loss kwargs, edit(zs, zt, zr, y, extras) putting the case's non-finite input into row 0, expected
# row-0 loss: "finite" | "+inf" | "-inf" | "nan"). Row 3 is masked; "served" passes the teacher and the
# reference as per-token log-probs, "rollout" adds rollout_logprobs.
_NONFINITE_CASES = {
    # 2. -inf = probability 0, exact
    "student -inf off target": (dict(mode="full", lam=1.25), lambda zs, zt, zr, y, x: _set(zs, 0, 5, -INF), "finite"),
    "student -inf off target, sampled": (dict(mode="sampled", lam=1.25),
                                         lambda zs, zt, zr, y, x: _set(zs, 0, 5, -INF), "finite"),
    "student and teacher -inf, full": (dict(mode="full", lam=1.25),
                                       lambda zs, zt, zr, y, x: (_set(zs, 0, 5, -INF), _set(zt, 0, 5, -INF)),
                                       "finite"),
    "teacher -inf where p_s > 0, full": (dict(mode="full", lam=1.25),
                                         lambda zs, zt, zr, y, x: _set(zt, 0, 5, -INF), "+inf"),
    "teacher -inf off target, sampled": (dict(mode="sampled", lam=1.25),
                                         lambda zs, zt, zr, y, x: _set(zt, 0, 5, -INF), "finite"),
    "teacher -inf at target, sampled": (dict(mode="sampled", lam=1.25),
                                        lambda zs, zt, zr, y, x: _set(zt, 0, int(y[0]), -INF), "+inf"),
    "reference -inf at target, lam 0.5": (dict(mode="sampled", lam=0.5),
                                          lambda zs, zt, zr, y, x: _set(zr, 0, int(y[0]), -INF), "+inf"),
    "reference -inf at target, lam 2": (dict(mode="sampled", lam=2.0),
                                        lambda zs, zt, zr, y, x: _set(zr, 0, int(y[0]), -INF), "-inf"),
    "student -inf at target, sampled": (dict(mode="sampled", lam=1.25),
                                        lambda zs, zt, zr, y, x: _set(zs, 0, int(y[0]), -INF), "nan"),
    "student -inf at target, full": (dict(mode="full", lam=1.25),
                                     lambda zs, zt, zr, y, x: _set(zs, 0, int(y[0]), -INF), "finite"),
    "student -inf everywhere": (dict(mode="full", lam=1.25),
                                lambda zs, zt, zr, y, x: _set(zs, 0, slice(None), -INF), "nan"),
    # 3. a model whose coefficient is 0 is not read
    "reference -inf at target, lam 1, sampled": (dict(mode="sampled", lam=1.0),
                                                 lambda zs, zt, zr, y, x: _set(zr, 0, int(y[0]), -INF), "finite"),
    "reference -inf where p_s > 0, lam 1, full": (dict(mode="full", lam=1.0),
                                                  lambda zs, zt, zr, y, x: _set(zr, 0, 5, -INF), "finite"),
    "teacher nan, lam 0, full": (dict(mode="full", lam=0.0), lambda zs, zt, zr, y, x: _set(zt, 0, 5, NAN), "finite"),
    "teacher nan, lam 0, sampled": (dict(mode="sampled", lam=0.0),
                                    lambda zs, zt, zr, y, x: _set(zt, 0, 5, NAN), "finite"),
    # 4. everything else: IEEE, no NaN dropped, a non-finite loss gives a NaN gradient row
    "student nan": (dict(mode="full", lam=1.25), lambda zs, zt, zr, y, x: _set(zs, 0, 7, NAN), "nan"),
    "student nan, sampled": (dict(mode="sampled", lam=1.25), lambda zs, zt, zr, y, x: _set(zs, 0, 7, NAN), "nan"),
    "student +inf": (dict(mode="full", lam=1.25), lambda zs, zt, zr, y, x: _set(zs, 0, 7, INF), "nan"),
    "teacher +inf, full": (dict(mode="full", lam=1.25), lambda zs, zt, zr, y, x: _set(zt, 0, 5, INF), "nan"),
    "teacher +inf, sampled": (dict(mode="sampled", lam=1.25), lambda zs, zt, zr, y, x: _set(zt, 0, 5, INF), "nan"),
    "reference nan, full": (dict(mode="full", lam=1.25), lambda zs, zt, zr, y, x: _set(zr, 0, 9, NAN), "nan"),
    "teacher_logprobs -inf": (dict(mode="sampled", lam=1.25, served=True),
                              lambda zs, zt, zr, y, x: _set(x["teacher_logprobs"], 0, None, -INF), "+inf"),
    "teacher_logprobs nan, lam 0": (dict(mode="sampled", lam=0.0, served=True),
                                    lambda zs, zt, zr, y, x: _set(x["teacher_logprobs"], 0, None, NAN), "finite"),
    "rollout_logprobs nan": (dict(mode="full", lam=1.25, rollout=True),
                             lambda zs, zt, zr, y, x: _set(x["rollout_logprobs"], 0, None, NAN), "nan"),
    "rollout_logprobs -inf (weight capped)": (dict(mode="sampled", lam=1.25, rollout=True),
                                              lambda zs, zt, zr, y, x: _set(x["rollout_logprobs"], 0, None, -INF),
                                              "finite"),
}


def _classify(x):
    x = float(x)
    return "nan" if x != x else "+inf" if x == INF else "-inf" if x == -INF else "finite"


def _nonfinite_inputs(name):
    kw, edit, expect = _NONFINITE_CASES[name]
    kw = dict(kw)
    zs, zt, zr, _ = make_problem(4, 33, seed=31, dtype=torch.float32, scale=2.0, mask_frac=0.0)
    y = torch.tensor([11, 20, 3, -100])
    extras = {}
    if kw.pop("served", False):
        extras["teacher_logprobs"] = torch.log_softmax(zt.double(), -1).gather(1, y.clamp(min=0)[:, None]).squeeze(1)
        extras["ref_logprobs"] = torch.log_softmax(zr.double(), -1).gather(1, y.clamp(min=0)[:, None]).squeeze(1)
    if kw.pop("rollout", False):
        extras["rollout_logprobs"] = torch.full((4,), -3.0, dtype=torch.float64)
    edit(zs, zt, zr, y, extras)
    extras = {k: t.float() for k, t in extras.items()}
    # The masked row 3 holds garbage that must never be read (rule 1).
    zs[3, :5], zt[3, 7], zr[3, 9] = NAN, INF, -INF
    for t in extras.values():
        t[3] = NAN
    if "teacher_logprobs" in extras:
        zt, zr = None, None
    models = [zs, zt, zr]
    return models, y, {**kw, **extras}, expect


def _run_nonfinite(fn, models, y, kw, device, **more):
    zs, zt, zr = (None if z is None else z.to(device) for z in models)
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    z = zs.clone().requires_grad_(True)
    out = fn(z, y.to(device), zt, zr, reduction="none", **kw, **more)
    (g,) = torch.autograd.grad((out.loss * torch.tensor([-1.0, 0.5, 1.0, 2.0], device=device)).sum(), z)
    return out, g.cpu()


def _same(a, b, tol):
    """Equal up to tol where finite, and non-finite in the same places with the same values."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    if not torch.equal(a.isnan(), b.isnan()) or not torch.equal(a.isinf() & (a > 0), b.isinf() & (b > 0)) \
            or not torch.equal(a.isinf() & (a < 0), b.isinf() & (b < 0)):
        return False
    fin = torch.isfinite(a)
    return bool(((a[fin] - b[fin]).abs() <= tol * (1 + b[fin].abs())).all())


@pytest.mark.parametrize("case", list(_NONFINITE_CASES))
@pytest.mark.parametrize("backend", ["reference"] + ALL)
def test_non_finite_inputs_follow_one_rule(use_backend, backend, case):
    """The rule in gopd_kernels.reference's docstring. Row 0 holds the case's non-finite
    input and must give the expected loss class (finite, +inf, -inf or NaN); a non-finite loss gives a
    gradient row that is NaN in every entry, a finite one a finite row equal to the reference's; rows 1
    and 2 are untouched, and the masked row 3 (full of NaN / inf) gives loss 0 and a zero gradient."""
    models, y, kw, expect = _nonfinite_inputs(case)
    if backend == "reference":
        fn, device = R.gopd_loss, "cpu"
        more = {}
    else:
        name, device = use_backend(backend)
        fn, more = gk.gopd_loss, dict(backend=name)
    out, g = _run_nonfinite(fn, models, y, kw, device, **more)
    loss = out.loss.cpu()
    assert _classify(loss[0]) == expect, f"{case}: loss {loss.tolist()}"
    if expect == "finite":
        assert torch.isfinite(g[0]).all(), f"{case}: gradient row {g[0]}"
    else:
        assert g[0].isnan().all(), f"{case}: gradient row must be NaN everywhere, got {g[0]}"
    assert torch.isfinite(loss[1:3]).all() and torch.isfinite(g[1:3]).all(), case
    assert loss[3] == 0 and (g[3] == 0).all(), f"{case}: the masked row was read"
    # Finite values and the diagnostics agree with the reference (in fp64 on the same fp32 inputs).
    ref, g_ref = _run_nonfinite(R.gopd_loss, [None if z is None else z.double() for z in models], y,
                                {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}, "cpu")
    assert _same(loss, ref.loss, 1e-4), (loss, ref.loss)
    assert _same(g, g_ref, 1e-4), case
    for diag in DIAGS:
        a, b = getattr(out, diag), getattr(ref, diag)
        assert (a is None) == (b is None), diag
        if a is not None:
            assert _same(a, b, 1e-4), f"{case}: {diag} {a.tolist()} vs the reference's {b.tolist()}"


def test_gemm_out_dtype_is_probed_by_running_it_not_by_its_overload():
    """The bf16 tensor-core dH / dW path needs torch.addmm(fp32 acc, bf16, bf16,
    out_dtype=float32, out=acc). torch 2.8 / 2.9 have the overload but raise (their kernel wants acc in
    bf16), and CPU builds have it but no kernel: the capability is probed by running it."""
    from gopd_kernels import autograd

    assert "dtype_out" in torch.ops.aten.addmm.overloads()  # the overload exists on this torch ...
    cpu = torch.device("cpu")
    assert autograd._probe_gemm_out_dtype(cpu, torch.bfloat16) == (False, False)  # ... but does not run here
    assert autograd.gemm_out_dtype_support(cpu, torch.bfloat16) == (False, False)

    def mm_fp32(a, b, out_dtype):
        return a.float() @ b.float()

    def addmm_fp32(acc, a, b, beta, out_dtype, out):
        return out.copy_(beta * acc + a.float() @ b.float())

    def addmm_torch_2_9(acc, a, b, beta, out_dtype, out):  # what torch 2.8 / 2.9 do
        raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")

    def addmm_rounds_to_bf16(acc, a, b, beta, out_dtype, out):  # a kernel that does not keep fp32
        return out.copy_((beta * acc + a.float() @ b.float()).bfloat16().float() + 2 ** -9)

    for addmm, want in ((addmm_fp32, True), (addmm_torch_2_9, False), (addmm_rounds_to_bf16, False)):
        assert autograd._probe_gemm_out_dtype(cpu, torch.bfloat16, mm=mm_fp32, addmm=addmm) == (True, want)


@pytest.mark.parametrize("backend", [b for b in ALL if b in ("torch", "triton", "cuda-emulated")])
def test_out_of_range_targets_give_nan_and_read_nothing(use_backend, backend):
    """On a GPU the targets are not range-checked on the host (that would synchronise every call):
    the backends that run there must not read out of bounds for such a target and give
    that token NaN log-probs instead; the other tokens are unaffected."""
    name, device = use_backend(backend)
    zs, zt, zr, _ = make_problem(3, 50, seed=2, dtype=torch.float32, device=device)
    y = torch.tensor([4, 50 + 10**6, -7], device=device)
    module = backends.get(backends.resolve(name, torch.device(device)))
    stats = module.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, -100).cpu()
    assert stats[[3, 4, 5]][:, 1:].isnan().all(), stats
    assert torch.isfinite(stats[:, 0]).all()
    ok = torch_backend_rows(zs[:1], zt[:1], zr[:1], y[:1])
    torch.testing.assert_close(stats[:, 0].double(), ok[:, 0].double(), rtol=1e-5, atol=1e-5)


def torch_backend_rows(zs, zt, zr, y):
    from gopd_kernels.backends import torch as torch_backend

    return torch_backend.rows_forward(zs.cpu(), zt.cpu(), zr.cpu(), y.cpu(), 1.0, 1.0, 1.0, -100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core dH / dW path runs on a CUDA GPU")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("triton", "cuda")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_bf16_tensor_core_grads_match_the_reference(backend, reduction):
    """bf16 heads on a GPU: logits from the GEMM's fp32 output, dH / dW from bf16 GEMMs accumulated in
    fp32 (torch.addmm(..., out_dtype=float32) where gemm_out_dtype_support finds it runs), against the
    reference on fp64 copies; the error must stay at bf16's level (the gradient is rounded to bf16 once)."""
    from gopd_kernels.autograd import gemm_out_dtype_support

    g = torch.Generator().manual_seed(41)
    n, v, d = 300, 1031, 96
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(torch.bfloat16).cuda()  # noqa: E731
    hs, ws, ht, wt, hr, wr = mk(n, d), mk(v, d, sc=0.3), mk(n, d), mk(v, d, sc=0.3), mk(n, d), mk(v, d, sc=0.3)
    y = torch.randint(0, v, (n,), generator=g).cuda()
    y[::7] = -100
    params = [hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)]
    out = gk.fused_linear_gopd_loss(*params, y, ht, wt, hr, wr, lam=1.25, mode="full", reduction=reduction,
                                    backend=backend, chunk_size=128)
    up = torch.linspace(-1, 2, n, device="cuda")
    loss = (out.loss * up).sum() if reduction == "none" else out.loss
    grads = torch.autograd.grad(loss, params)
    ref_params = [p.detach().double().requires_grad_(True) for p in (hs, ws)]
    ref = R.gopd_loss(ref_params[0] @ ref_params[1].T, y, ht.double() @ wt.double().T, hr.double() @ wr.double().T,
                      lam=1.25, mode="full", reduction=reduction)
    ref_loss = (ref.loss * up.double()).sum() if reduction == "none" else ref.loss
    ref_grads = torch.autograd.grad(ref_loss, ref_params)
    assert max_err(loss, ref_loss) <= 1e-3 * (1 + abs(float(ref_loss)))
    for name, a, b in zip(("dh", "dW"), grads, ref_grads):
        assert a.dtype == torch.bfloat16
        assert max_err(a, b) <= 2e-2 * float(b.abs().max()), name
    print("tensor-core path used:", gemm_out_dtype_support(torch.device("cuda"), torch.bfloat16))


# ---- the paper-faithful options: sequence reductions and the advantage from old_logprobs ----------------
@pytest.mark.parametrize("backend", BACKENDS)
@given(b=st.integers(1, 4), t=st.integers(1, 6), mode=st.sampled_from(gk.MODES),
       reduction=st.sampled_from(["seq-mean-token-mean", "seq-mean-token-sum"]), lam=st.sampled_from([1.0, 1.25]),
       global_seqs=st.sampled_from([None, 7]), seed=st.integers(0, 1000))
@settings(max_examples=12)
def test_sequence_reductions_match_reference(backend, b, t, mode, reduction, lam, global_seqs, seed):
    """Ragged masks: each sequence keeps a random prefix of its tokens (possibly none); both ops, against the
    reference, in the backend's widest dtype."""
    dtype = torch.float64 if supports(backend, torch.float64) else torch.float32
    dev, v, d = device_for(backend), 11, 5
    g = torch.Generator().manual_seed(seed)
    zs, zt, zr, y = make_problem(b * t, v, seed=seed, mask_frac=0.0, dtype=dtype, device=dev)
    keep = torch.arange(t)[None, :] < torch.randint(0, t + 1, (b, 1), generator=g)
    y = torch.where(keep.reshape(-1).to(dev), y, -100).view(b, t)
    zt, topk = teacher_args(mode, zt, v)
    topk = {k: x.view(b, t, -1) for k, x in topk.items()}
    kw = dict(lam=lam, mode=mode, reduction=reduction, num_sequences_in_batch=global_seqs, **topk)
    shaped = [None if z is None else z.view(b, t, -1) for z in (zs, zt, zr)]
    ours, g_ours = run(gk.gopd_loss, shaped[0], y, shaped[1], shaped[2], backend=backend, **kw)
    ref, g_ref = run(R.gopd_loss, shaped[0], y, shaped[1], shaped[2], **kw)
    rel = 1e-9 if dtype == torch.float64 else 1e-5
    assert max_err(ours.loss, ref.loss) <= rel * (1 + abs(float(ref.loss)))
    assert max_err(g_ours, g_ref) <= rel * (1 + float(g_ref.abs().max()))
    # The fused-linear op on random heads (student, teacher and reference share one here).
    h = torch.randn(b, t, d, generator=g, dtype=torch.float64).to(dtype=dtype, device=dev)
    w = torch.randn(v, d, generator=g, dtype=torch.float64).to(dtype=dtype, device=dev)
    hw = h.clone().requires_grad_(True)
    fused = gk.fused_linear_gopd_loss(hw, w, y, None if zt is None else h, None if zt is None else w, h, w,
                                      backend=backend, chunk_size=3, **kw)
    h64 = h.double().clone().requires_grad_(True)
    z64 = h64 @ w.double().T
    want = R.gopd_loss(z64, y, None if zt is None else z64.detach(), z64.detach(), **kw)
    (g_fused,) = torch.autograd.grad(fused.loss, hw)
    (g_want,) = torch.autograd.grad(want.loss, h64)
    assert max_err(fused.loss, want.loss) <= rel * (1 + abs(float(want.loss)))
    assert max_err(g_fused, g_want) <= rel * (1 + float(g_want.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_advantage_from_old_logprobs_matches_reference(backend, reduction):
    dev = device_for(backend)
    zs, zt, zr, y = make_problem(13, 17, seed=3, device=dev)
    old = (torch.randn(13, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - 3).to(dev)
    kw = dict(lam=1.25, mode="sampled", reduction=reduction, old_logprobs=old, advantage_from="old")
    ours, g = run(gk.gopd_loss, zs, y, zt, zr, backend=backend, **kw)
    ref, g_ref = run(R.gopd_loss, zs, y, zt, zr, **kw)
    assert max_err(ours.loss, ref.loss) <= 1e-9 * (1 + float(ref.loss.abs().max()))
    assert max_err(ours.advantage, ref.advantage) <= 1e-9 * (1 + float(ref.advantage.abs().max()))
    assert max_err(g, g_ref) <= 1e-9 * (1 + float(g_ref.abs().max()))
    # It changes the advantage: not the current-policy one.
    current = gk.gopd_loss(zs, y, zt, zr, backend=backend, **{**kw, "advantage_from": "current"})
    assert max_err(current.advantage, ours.advantage) > 1e-3
