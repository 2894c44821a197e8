"""Triton backend: the row contract of ``gopd_kernels.backends`` on single-pass Triton kernels.

Runs on CUDA tensors natively, and on CPU tensors under the Triton interpreter
(environment variable TRITON_INTERPRET=1 set before triton is imported; slow, for tests).

Under torch.compile the kernels are called through the custom ops ``torch.ops.gopd_triton.rows_forward``
/ ``rows_backward`` (torch.library, with fake implementations), so a compiled graph holds them as
opaque nodes instead of tracing into Triton's launcher; their statistics are float64 (the kernels'
own, or up-cast: O(N)). Eager calls go straight to the kernels.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .._validate import compiling
from . import NSTATS

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


def _check_rows(**tensors):
    for name, t in tensors.items():
        if t is not None and t.dim() == 2 and t.shape[1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"triton backend: {name} needs stride(-1) == 1, got strides {t.stride()}")


def rows_forward(zs, zt, zr, targets, ts, tt, tr, ignore_index):
    from ..triton import rows

    _check_device(zs=zs, zt=zt, zr=zr, targets=targets)
    _check_rows(zs=zs, zt=zt, zr=zr)
    if compiling():
        return torch.ops.gopd_triton.rows_forward(zs, zt, zr, targets.contiguous(), ts, tt, tr, ignore_index)
    return rows.rows_forward(zs, zt, zr, targets.contiguous(), ts, tt, tr, ignore_index)


def rows_backward(zs, zt, zr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out):
    from ..triton import rows

    _check_device(zs=zs, zt=zt, zr=zr, targets=targets, stats=stats, g_lp=g_lp, g_loss=g_loss, out=out)
    _check_rows(zs=zs, zt=zt, zr=zr, out=out)
    if compiling():
        torch.ops.gopd_triton.rows_backward(zs, zt, zr, targets.contiguous(), stats, g_lp, g_loss, lam, ts, tt,
                                            tr, ignore_index, out)
        return out
    return rows.rows_backward(zs, zt, zr, targets.contiguous(), stats, g_lp, g_loss, lam, ts, tt, tr,
                              ignore_index, out)


# The custom ops used under torch.compile (see the module docstring).
@torch.library.custom_op("gopd_triton::rows_forward", mutates_args=())
def _op_rows_forward(zs: torch.Tensor, zt: Optional[torch.Tensor], zr: Optional[torch.Tensor],
                     targets: torch.Tensor, ts: float, tt: float, tr: float, ignore_index: int) -> torch.Tensor:
    from ..triton import rows

    return rows.rows_forward(zs, zt, zr, targets, ts, tt, tr, ignore_index).to(torch.float64)


@_op_rows_forward.register_fake
def _(zs, zt, zr, targets, ts, tt, tr, ignore_index):
    return zs.new_empty((NSTATS, zs.shape[0]), dtype=torch.float64)


@torch.library.custom_op("gopd_triton::rows_backward", mutates_args=("out",))
def _op_rows_backward(zs: torch.Tensor, zt: Optional[torch.Tensor], zr: Optional[torch.Tensor],
                      targets: torch.Tensor, stats: torch.Tensor, g_lp: torch.Tensor, g_loss: torch.Tensor,
                      lam: float, ts: float, tt: float, tr: float, ignore_index: int, out: torch.Tensor) -> None:
    from ..triton import rows

    rows.rows_backward(zs, zt, zr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out)


@_op_rows_backward.register_fake
def _(zs, zt, zr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out):
    return None
