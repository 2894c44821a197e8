"""Triton backend: the row contract of ``gopd_kernels.backends`` on single-pass Triton kernels.

Runs on CUDA tensors natively, and on CPU tensors under the Triton interpreter
(environment variable TRITON_INTERPRET=1 set before triton is imported; slow, for tests).

Under torch.compile the kernels are reached like every backend's, through gopd_kernels._compile's
custom ops, so a compiled graph holds them as opaque nodes instead of tracing into Triton's launcher.
"""

from __future__ import annotations

import os

import torch

# The logit dtypes the kernels take (fp64 accumulates in fp64, the others in fp32).
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_WHY_NO_DEVICE = "triton needs a CUDA GPU (or TRITON_INTERPRET=1 with CPU tensors)"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available():
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed ({exc}); `pip install triton`"
    if torch.cuda.is_available() or _interpreting():
        return True, ""
    return False, _WHY_NO_DEVICE


def _check_device(**tensors):
    """All tensors on one device that this backend can run on; names the offender otherwise."""
    device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"triton backend: {name} is on {t.device}, expected {device} like zs")
    if device.type == "cuda":
        return
    if device.type == "cpu" and _interpreting():
        return
    raise ValueError(f"triton backend: tensors on {device} are not supported; {_WHY_NO_DEVICE}")


def _check_dtype(zs):
    if zs.dtype not in DTYPES:
        raise TypeError(f"triton backend: unsupported logits dtype {zs.dtype}; expected one of {DTYPES}")


def _check_rows(**tensors):
    for name, t in tensors.items():
        if t is not None and t.dim() == 2 and t.shape[1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"triton backend: {name} needs stride(-1) == 1, got strides {t.stride()}")


def rows_forward(zs, zt, zr, targets, ts, tt, tr, ignore_index):
    from ..triton import rows

    _check_device(zs=zs, zt=zt, zr=zr, targets=targets)
    _check_rows(zs=zs, zt=zt, zr=zr)
    _check_dtype(zs)
    return rows.rows_forward(zs, zt, zr, targets.contiguous(), ts, tt, tr, ignore_index)


def rows_backward(zs, zt, zr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out):
    from ..triton import rows

    _check_device(zs=zs, zt=zt, zr=zr, targets=targets, stats=stats, g_lp=g_lp, g_loss=g_loss, out=out)
    _check_rows(zs=zs, zt=zt, zr=zr, out=out)
    _check_dtype(zs)
    return rows.rows_backward(zs, zt, zr, targets.contiguous(), stats, g_lp, g_loss, lam, ts, tt, tr,
                              ignore_index, out)
