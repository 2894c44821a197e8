"""torch.compile: the row ops are custom ops with fake implementations, and a training step (a tiny model
with the fused loss, forward + backward) compiles with fullgraph=True and matches eager.

On CPU the step is compiled with the "aot_eager" backend: Dynamo captures the whole forward in one graph
(fullgraph), AOTAutograd traces forward and backward with fake tensors (this is what needs the fakes
and breaks on any data-dependent check), and the graph then runs op by op. Inductor adds code
generation on top, about a minute of C++ compilation on a small CPU; it runs where there is a GPU.
"""

import pytest
import torch

import gopd_kernels as gk
from gopd_kernels import backends

from helpers import missing

N, D, V = 12, 8, 30


def _need(backend):
    if backend == "cpu" and not backends.is_available("cpu"):
        missing("the C++ extension (backend 'cpu')")
    if not backends.is_available(backend):
        pytest.skip(f"backend {backend} is not available here")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _row_args(dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    zs, zt, zr = (torch.randn(5, 16, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    y = torch.tensor([1, -100, 3, 15, 0], device=device)
    return zs, zt, zr, y


def _backward_args(zs, zt, zr, y, stats):
    g_lp = torch.linspace(-1, 1, 5, dtype=torch.float64 if zs.dtype == torch.float64 else torch.float32)
    g_loss = torch.linspace(0.5, 2, 5, dtype=g_lp.dtype)
    return (zs, zt, zr, y, stats, g_lp.to(zs.device), g_loss.to(zs.device), 1.25, 1.0, 0.9, 1.1, -100,
            torch.empty_like(zs))


@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_row_ops_fakes_agree_with_every_backend(backend):
    """One set of custom ops (gopd_kernels._compile) carries every backend into a compiled graph; their
    fakes agree with what each backend's kernels return."""
    _need(backend)
    from gopd_kernels import _compile  # noqa: F401  (defines torch.ops.gopd_kernels.*)

    ops = torch.ops.gopd_kernels
    module = backends.get(backend)
    checks = ("test_schema", "test_faketensor")
    # Triton needs GPU tensors on a GPU (CPU tensors only under its interpreter, without one).
    device = "cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu"
    for dtype in (d for d in (torch.float32, torch.bfloat16) if d in module.DTYPES):
        zs, zt, zr, y = _row_args(dtype, device)
        fwd = (backend, zs, zt, zr, y, 1.0, 0.9, 1.1, -100)
        torch.library.opcheck(ops.rows_forward.default, fwd, test_utils=checks)
        args = _backward_args(zs, zt, zr, y, ops.rows_forward(*fwd))
        torch.library.opcheck(ops.rows_backward.default, (backend, *args), test_utils=checks)
        if hasattr(module, "rows_forward_backward"):
            torch.library.opcheck(ops.rows_forward_backward.default, (backend, *args[:4], *args[5:]),
                                  test_utils=checks)


class TinyModel(torch.nn.Module):
    def __init__(self, backend, **options):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.body = torch.nn.Linear(D, D)
        self.head = gk.GOPDHead(torch.nn.Linear(D, V, bias=False), backend=backend, chunk_size=5, **options)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5

    def forward(self, x, targets, teacher_hidden, teacher_weight, ref_hidden, ref_weight):
        out = self.head(torch.tanh(self.body(x)), targets, teacher_hidden, ref_hidden, teacher_weight=teacher_weight,
                        ref_weight=ref_weight)
        loss = out.loss if out.loss.dim() == 0 else (out.loss * torch.linspace(0.5, 1.5, N)).sum()
        return loss, out.kl


def _batch():
    g = torch.Generator().manual_seed(2)
    x, ht, hr = (torch.randn(N, D, generator=g) for _ in range(3))
    wt, wr = torch.randn(V, D, generator=g) * 0.5, torch.randn(V, D, generator=g) * 0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = -100
    return x, y, ht, wt, hr, wr


def _step(fn, model, batch):
    model.zero_grad(set_to_none=True)
    loss, kl = fn(*batch)
    loss.backward()
    return loss.detach(), kl, [p.grad.clone() for p in model.parameters()]


def _topk_teacher(ht, wt, k=4):
    top = torch.log_softmax(ht @ wt.t(), -1).topk(k)
    return dict(teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values)


@pytest.mark.parametrize("backend,mode,reduction", [
    ("cpu", "sampled", "mean"), ("cpu", "full", "none"), ("torch", "full", "sum"), ("cpu", "topk", "mean"),
    ("torch", "topk", "none")])
def test_compiled_step_is_one_graph_and_matches_eager(backend, mode, reduction):
    _need(backend)
    batch = _batch()
    extra = {}
    if mode == "topk":  # the teacher as its top-k: no teacher head in the call
        x, y, ht, wt, hr, wr = batch
        extra = _topk_teacher(ht, wt)
        batch = (x, y, None, None, hr, wr)
    model = TinyModel(backend, lam=1.25, mode=mode, reduction=reduction, **extra)
    want = _step(model, model, batch)
    got = _step(torch.compile(model, fullgraph=True, backend="aot_eager"), model, batch)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_compiled_gopd_loss_on_logits_matches_eager():
    _need("cpu")
    zs, zt, zr, y = _row_args()
    zs.requires_grad_(True)

    def loss(zs, y, zt, zr):
        out = gk.gopd_loss(zs, y, zt, zr, lam=1.25, mode="sampled", backend="cpu")
        return out.loss, out.advantage

    want = loss(zs, y, zt, zr)
    (want_grad,) = torch.autograd.grad(want[0], zs)
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(zs, y, zt, zr)
    (got_grad,) = torch.autograd.grad(got[0], zs)
    for g, w in zip((*got, got_grad), (*want, want_grad)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_data_dependent_checks_still_fire_under_compile():
    """Under compile a bad token id cannot be checked while tracing; it is asserted when the graph runs."""
    _need("cpu")
    model = TinyModel("cpu", mode="full")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, y, ht, wt, hr, wr = _batch()
    compiled(x, y, ht, wt, hr, wr)
    y_bad = y.clone()
    y_bad[1] = V
    with pytest.raises(RuntimeError, match=r"targets: a token id is out of range \[0, 30\)"):
        compiled(x, y_bad, ht, wt, hr, wr)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's code generation is tested on a GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_inductor_step_on_cuda_matches_eager(backend):
    _need(backend)
    model = TinyModel(backend, lam=1.25, mode="full").cuda()
    batch = [t.cuda() for t in _batch()]
    want = _step(model, model, batch)
    got = _step(torch.compile(model, fullgraph=True), model, batch)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_backend_resolution_is_a_constant_to_dynamo():
    """backends.resolve carries the mark torch.compiler.assume_constant_result sets (set by hand so that
    importing gopd_kernels does not import Dynamo), and a compiled call with backend="auto" is one graph."""
    probe = torch.compiler.assume_constant_result(lambda: None)
    assert vars(probe) == {"_dynamo_marked_constant": True}, "torch changed how it marks a constant function"
    assert vars(backends.resolve).items() >= vars(probe).items()
    zs, zt, zr, y = _row_args()

    def loss(zs, y, zt, zr):
        return gk.gopd_loss(zs, y, zt, zr, lam=1.25, mode="full", backend="auto").loss

    torch.testing.assert_close(torch.compile(loss, fullgraph=True, backend="aot_eager")(zs, y, zt, zr),
                               loss(zs, y, zt, zr), rtol=1e-5, atol=1e-6)


def test_import_does_not_load_dynamo():
    """`import gopd_kernels` stays cheap: Dynamo (about as slow to import as torch itself) loads only when
    the user compiles."""
    import subprocess
    import sys

    code = "import sys, gopd_kernels; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
