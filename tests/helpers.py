"""Shared test inputs and the Cut-Cross-Entropy-style error judgement."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

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
