"""The one route by which every backend's row kernels reach torch.compile.

torch.compile traces with fake tensors (shapes, dtypes, devices, no data). A row kernel must be an
opaque node in the graph: the C++ and CUDA ops, Triton's launcher and the plain-torch backend's
data-dependent row loops (``nonzero``) cannot be traced into. So while compiling, the row calls of
``gopd_kernels.autograd.RowConfig`` go through the three custom ops below, whose first argument names
the backend and whose bodies call that backend's module (``gopd_kernels.backends.get``) at run time:

    torch.ops.gopd_kernels.rows_forward(backend, zs, zt, zr, targets, ts, tt, tr, ignore_index) -> stats
    torch.ops.gopd_kernels.rows_backward(backend, ..., out)            (writes out)
    torch.ops.gopd_kernels.rows_forward_backward(backend, ..., out) -> stats   (writes out)

One fake each: the statistics are [NSTATS, N] float64 (every backend's own; an fp32 one would be up-cast,
O(N)); the backward ops only write into ``out``. Eager calls go to the backend module directly.
tests/test_compile.py checks the fakes against every backend (torch.library.opcheck) and a compiled step
against eager.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backends
from ._layout import NSTATS

Tensor = torch.Tensor


def _stats_like(zs):
    return zs.new_empty((NSTATS, zs.shape[0]), dtype=torch.float64)


@torch.library.custom_op("gopd_kernels::rows_forward", mutates_args=())
def rows_forward(backend: str, zs: Tensor, zt: Optional[Tensor], zr: Optional[Tensor], targets: Tensor, ts: float,
                 tt: float, tr: float, ignore_index: int) -> Tensor:
    return backends.get(backend).rows_forward(zs, zt, zr, targets, ts, tt, tr, ignore_index).to(torch.float64)


@rows_forward.register_fake
def _(backend, zs, zt, zr, targets, ts, tt, tr, ignore_index):
    return _stats_like(zs)


@torch.library.custom_op("gopd_kernels::rows_backward", mutates_args=("out",))
def rows_backward(backend: str, zs: Tensor, zt: Optional[Tensor], zr: Optional[Tensor], targets: Tensor,
                  stats: Tensor, g_lp: Tensor, g_loss: Tensor, lam: float, ts: float, tt: float, tr: float,
                  ignore_index: int, out: Tensor) -> None:
    backends.get(backend).rows_backward(zs, zt, zr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index,
                                        out)


@rows_backward.register_fake
def _(backend, zs, zt, zr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out):
    return None


@torch.library.custom_op("gopd_kernels::rows_forward_backward", mutates_args=("out",))
def rows_forward_backward(backend: str, zs: Tensor, zt: Optional[Tensor], zr: Optional[Tensor], targets: Tensor,
                          g_lp: Tensor, g_loss: Tensor, lam: float, ts: float, tt: float, tr: float,
                          ignore_index: int, out: Tensor) -> Tensor:
    module = backends.get(backend)
    return module.rows_forward_backward(zs, zt, zr, targets, g_lp, g_loss, lam, ts, tt, tr, ignore_index,
                                        out).to(torch.float64)


@rows_forward_backward.register_fake
def _(backend, zs, zt, zr, targets, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out):
    return _stats_like(zs)
