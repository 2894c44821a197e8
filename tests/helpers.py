"""Shared test inputs and the Cut-Cross-Entropy-style error judgement."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from gopd_kernels import backends

# `make test` (and so CI) sets this: a test dependency that is missing fails the run instead of skipping,
# so a set-up step that stopped installing something cannot hide behind a skip.
STRICT = os.environ.get("GOPD_TEST_STRICT") == "1"


def missing(what: str) -> None:
    """Skip the calling test module because `what` is not installed here; fail instead under GOPD_TEST_STRICT=1."""
    if STRICT:
        pytest.fail(f"{what} is not installed; `make test` installs it (GOPD_TEST_STRICT=1 turns this skip "
                    "into a failure)", pytrace=False)
    pytest.skip(f"{what} is not installed", allow_module_level=True)


def need(module: str):
    """Import and return `module`, or call `missing` for it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        missing(f"{module} ({err})")


def triton_device():
    """(triton module, device) for a Triton kernel test module: "cuda" on a GPU, else "cpu", where the kernels
    run through Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 before triton is first imported).
    Skips the module if triton is missing, or if it was imported without the interpreter and no GPU exists."""
    triton = need("triton")
    if torch.cuda.is_available():
        return triton, "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA GPU, and triton was imported before TRITON_INTERPRET=1 could be set; "
                    "run with TRITON_INTERPRET=1 in the environment", allow_module_level=True)
    return triton, "cpu"


def make_problem(n, v, *, seed=0, dtype=torch.float64, scale=3.0, mask_frac=0.2, inf_cols=0, pad=0,
                 device="cpu"):
    """Random student / teacher / reference logits [n, v(+pad)] and targets [n] with some masked.

    inf_cols columns are -inf in all three models (vocabulary masking); targets avoid them.
    """
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    zt = torch.randn(n, v + pad, generator=g, dtype=torch.float64) * scale
    zr = torch.randn(n, v + pad, generator=g, dtype=torch.float64) * scale
    allowed = v
    if inf_cols and v > inf_cols:
        allowed = v - inf_cols
        for z in (zs, zt, zr):
            z[:, allowed:v] = float("-inf")
    y = torch.randint(0, allowed, (n,), generator=g)
    y[torch.rand(n, generator=g) < mask_frac] = -100
    return tuple(x.to(dtype=dtype, device=device) for x in (zs, zt, zr)) + (y.to(device),)


def max_err(a, b):
    if a is None and b is None:
        return 0.0
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return float(d.max()) if d.numel() else 0.0


def assert_close_as_torch(ours, torch_same_dtype, truth, *, factor=4.0, floor=1e-6, what=""):
    """Our error vs the float64 truth may exceed plain torch's error in the same dtype by `factor`
    (plus a small floor relative to the magnitude, for when torch happens to be exact)."""
    ours_err = max_err(ours, truth)
    torch_err = max_err(torch_same_dtype, truth)
    scale = float(truth.double().abs().max()) if truth.numel() else 0.0
    bound = factor * torch_err + floor * (1 + scale)
    assert ours_err <= bound, f"{what}: error {ours_err:.3g} > {factor} x torch's {torch_err:.3g} (+floor)"


# ---- the one backend x dtype x mode matrix ------------------------------------------------------------
# The backends that can run here, each with the device its tensors live on and the logit dtypes it
# declares (backends.get(name).DTYPES: the backend's own list, which its kernels check).
BACKENDS = [b for b in backends.BACKENDS if backends.is_available(b)]
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def device_for(backend: str) -> str:
    """Where a backend's tensors live in the tests: CUDA for "cuda" (and "triton" on a GPU), else CPU
    (Triton through its interpreter)."""
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def interpreted(backend: str) -> bool:
    """True for Triton on CPU tensors (its interpreter: correct but slow, so tests keep V small there)."""
    return backend == "triton" and device_for(backend) == "cpu"


def dtypes_of(backend: str) -> tuple:
    return backends.get(backend).DTYPES


def supports(backend: str, dtype) -> bool:
    return dtype in dtypes_of(backend)


def backend_dtype_cases(dtypes, backend_list=None):
    """[(backend, dtype)] for every available backend and each of `dtypes` it supports."""
    return [(b, d) for b in (BACKENDS if backend_list is None else backend_list) for d in dtypes if supports(b, d)]


def device_backend_cases():
    """[(device, backend)]: every available backend on its device, and the torch backend on CUDA too where
    there is a GPU (the path whose logit GEMM autocast would otherwise run in 16 bits)."""
    cases = [(device_for(b), b) for b in BACKENDS]
    if torch.cuda.is_available() and "torch" in BACKENDS:
        cases.append(("cuda", "torch"))
    return cases


def topk_teacher(zt, v, k, temperature=1.0):
    """The teacher of mode="topk" from its logits [n, V'] (padding cut to v): its top-k ids and log-probs,
    what a server sends."""
    top = torch.log_softmax(zt[:, :v].double() / temperature, -1).topk(k)
    return dict(teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values.to(zt.dtype))


def teacher_args(mode, zt, v, k=None, temperature=1.0):
    """(teacher logits or None, extra keywords) of a call in `mode`: the logits themselves, or for
    mode="topk" the top-k of them (k defaults to about a third of the vocabulary, at least 1)."""
    if mode != "topk":
        return zt, {}
    return None, topk_teacher(zt, v, k or max(1, v // 3), temperature)


class LossRecorder:
    """Wraps gopd_kernels.fused_linear_gopd_loss (the trainer's one loss call) for a test: each call's
    (args, kwargs, output) goes to .calls and its output to .outs; a test may reset either with []."""

    def __init__(self, monkeypatch):
        import gopd_kernels

        self.calls, self.outs = [], []
        real = gopd_kernels.fused_linear_gopd_loss

        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            self.calls.append((args, kwargs, out))
            self.outs.append(out)
            return out

        monkeypatch.setattr(gopd_kernels, "fused_linear_gopd_loss", wrapped)
