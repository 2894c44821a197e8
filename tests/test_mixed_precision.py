"""Mixed precision: the one dtype rule (gopd_kernels._validate.math_dtype) and torch.autocast.

Under autocast(bf16) a trainer's hidden states come out bf16 while its LM head stays fp32; the fused ops
must accept that pair and keep the logits and the softmax in fp32. Each result is checked against the
float64 reference on the logits the inputs define exactly (h.double() @ W.double().T) at fp32-level
error: logits rounded to bf16 on the way (an autocast GEMM would) are off by ~1e-2 and fail.
"""

import pytest
import torch

import gopd_kernels as gk
from gopd_kernels import reference

from helpers import device_backend_cases

N, D, V = 12, 16, 40
TOL = 2e-5  # fp32-level; bf16-rounded logits give errors near 1e-2 at these logit scales
# (device, backend): every backend here on its device, and the torch backend on CUDA where there is a GPU
# (make gpu-check): the path whose logit GEMM autocast would otherwise run in bf16.
CASES = device_backend_cases()


def heads(seed=0):
    """bf16 hidden states (as autocast makes them) and fp32 LM heads for student, teacher, reference;
    logits of magnitude ~5, where a bf16 rounding moves a logit by ~0.02."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        h = (torch.randn(N, D, generator=g) * 1.5).to(torch.bfloat16)
        w = torch.randn(V, D, generator=g) * 0.35
        out.append((h, w))
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    return out, y


K = 5  # mode="topk": the teacher as its top-K ids and log-probs


def teacher_inputs(mode, ht, wt):
    """The teacher's part of a call: its head (hidden, weight), or for mode="topk" no head and its top-K
    ids / log-probs from the exact float64 logits (what a server would send)."""
    if mode != "topk":
        return (ht, wt), {}
    top = torch.log_softmax(ht.double() @ wt.double().t(), -1).topk(K)
    return (None, None), dict(teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values)


def truth(hw, y, **kw):
    """Reference loss, d loss / d h_s, d loss / d W_s in float64 from the exact logits."""
    (hs, ws), (ht, wt), (hr, wr) = hw
    h64 = hs.double().requires_grad_(True)
    w64 = ws.double().requires_grad_(True)
    (ht, wt), topk = teacher_inputs(kw["mode"], ht, wt)
    zt = None if ht is None else ht.double() @ wt.double().t()
    out = reference.gopd_loss(h64 @ w64.t(), y, zt, hr.double() @ wr.double().t(), **kw, **topk)
    loss = out.loss if out.loss.dim() == 0 else (out.loss * torch.linspace(0.5, 1.5, N, dtype=torch.float64)).sum()
    gh, gw = torch.autograd.grad(loss, (h64, w64))
    return loss.detach(), gh, gw


def rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("mode", gk.MODES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_under_autocast_is_fp32_exact(device, backend, mode, reduction):
    hw, y = heads()
    kw = dict(lam=1.25, mode=mode, reduction=reduction)
    ref_loss, ref_gh, ref_gw = truth(hw, y, **kw)
    (hs, ws), (ht, wt), (hr, wr) = ((h.to(device), w.to(device)) for h, w in hw)
    (ht, wt), topk = teacher_inputs(mode, ht, wt)
    topk = {name: x.to(device) for name, x in topk.items()}
    hs = hs.clone().requires_grad_(True)
    ws = ws.clone().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = gk.fused_linear_gopd_loss(hs, ws, y.to(device), ht, wt, hr, wr, backend=backend, chunk_size=5,
                                        **kw, **topk)
        weights = torch.linspace(0.5, 1.5, N, device=device)
        loss = out.loss if reduction == "mean" else (out.loss * weights).sum()
        loss.backward()  # inside the region: backward must switch autocast off too
    assert out.loss.dtype == torch.float32
    assert rel(loss.detach().cpu(), ref_loss) < TOL
    assert hs.grad.dtype == torch.bfloat16 and ws.grad.dtype == torch.float32
    assert rel(ws.grad.cpu(), ref_gw) < TOL
    assert rel(hs.grad.cpu(), ref_gh) < 1e-2  # dH comes back in the hidden states' dtype: bf16 rounding only


@pytest.mark.parametrize("device,backend", CASES)
def test_fused_linear_logprobs_under_autocast(device, backend):
    (hs, ws), _, _ = heads(1)[0]
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))
    with torch.autocast(device, dtype=torch.bfloat16):
        lp = gk.fused_linear_logprobs(hs.to(device), ws.to(device), y.to(device), backend=backend)
    want = torch.log_softmax(hs.double() @ ws.double().t(), -1).gather(1, y[:, None]).squeeze(1)
    assert lp.dtype == torch.float32
    assert float((lp.cpu().double() - want).abs().max()) < 1e-5


def test_the_row_kernels_run_with_autocast_off(monkeypatch):
    """The wiring behind the fp32 logits on every device: forward and backward of the fused op (the
    backward called inside the autocast region) reach the row kernels with autocast switched off."""
    from gopd_kernels.backends import torch as torch_backend
    seen = []
    for name in ("rows_forward", "rows_backward"):
        original = getattr(torch_backend, name)

        def spy(*args, _original=original, _name=name):
            seen.append((_name, torch.is_autocast_enabled("cpu")))
            return _original(*args)

        monkeypatch.setattr(torch_backend, name, spy)
    hw, y = heads(7)
    (hs, ws), (ht, wt), _ = hw
    ws = ws.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gk.fused_linear_gopd_loss(hs, ws, y, ht, wt, mode="full", reduction="none", backend="torch")
        out.loss.sum().backward()
    assert {name for name, _ in seen} == {"rows_forward", "rows_backward"}
    assert not any(enabled for _, enabled in seen)


def test_an_autocast_model_trains_through_the_fused_loss():
    """The common case: a model's forward under autocast gives bf16 hidden states, its head is an
    fp32 nn.Linear; the fused loss accepts the pair, and the gradients match the fp64 reference."""
    torch.manual_seed(0)
    body = torch.nn.Linear(D, D)
    head = torch.nn.Linear(D, V, bias=False)
    x = torch.randn(N, D)
    _, (ht, wt), _ = heads(2)[0]
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = body(x)
        assert h.dtype == torch.bfloat16 and head.weight.dtype == torch.float32
        out = gk.fused_linear_gopd_loss(h, head.weight, y, ht, wt, mode="full")
    out.loss.backward()
    w64 = head.weight.detach().double().requires_grad_(True)
    want = reference.gopd_loss(h.detach().double() @ w64.t(), y, ht.double() @ wt.double().t(), mode="full")
    want.loss.backward()
    assert rel(out.loss.detach(), want.loss.detach()) < TOL
    assert rel(head.weight.grad, w64.grad) < TOL
    assert body.weight.grad is not None


def test_one_dtype_rule_for_logits_and_hidden_states():
    """A bf16 teacher beside an fp32 student (or fp32 hidden states with a bf16 head) is accepted by every
    op alike; the math is fp32 unless some input is fp64, and then fp64."""
    g = torch.Generator().manual_seed(5)
    zs = torch.randn(N, V, generator=g) * 3
    zt = (torch.randn(N, V, generator=g) * 3).to(torch.bfloat16)
    y = torch.randint(0, V, (N,), generator=g)
    out = gk.gopd_loss(zs.requires_grad_(True), y, zt, mode="full", backend="torch")
    want = reference.gopd_loss(zs.detach().double(), y, zt.double(), mode="full")
    assert out.loss.dtype == torch.float32 and rel(out.loss.detach(), want.loss) < TOL
    out.loss.backward()
    assert zs.grad.dtype == torch.float32

    out64 = gk.gopd_loss(zs.detach(), y, zt.double(), mode="full", backend="torch")
    assert out64.loss.dtype == torch.float64

    (hs, ws), (ht, wt), _ = heads(6)[0]
    for s_hidden, s_weight in ((hs.float(), ws.to(torch.bfloat16)), (hs, ws), (hs.float(), ws.double())):
        out = gk.fused_linear_gopd_loss(s_hidden, s_weight, y, ht, wt.to(torch.bfloat16), mode="full",
                                        backend="torch")
        want = reference.gopd_loss(s_hidden.double() @ s_weight.double().t(), y,
                                   ht.double() @ wt.to(torch.bfloat16).double().t(), mode="full")
        math = torch.float64 if s_weight.dtype == torch.float64 else torch.float32
        assert out.loss.dtype == math and out.kl.dtype == math
        assert rel(out.loss, want.loss) < TOL
