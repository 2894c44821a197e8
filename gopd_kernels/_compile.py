"""What torch.compile needs to trace the ops in one graph (fullgraph=True).

torch.compile traces with fake tensors (shapes, dtypes, devices, no data). A row kernel is an opaque
node in the graph, so it needs a fake implementation that gives its outputs' metadata:
- the extension's ops ``torch.ops.gopd.rows_forward`` / ``rows_backward`` / ``rows_forward_backward``
  (csrc/module.cpp): fakes registered here (register_fakes);
- the Triton kernels: custom ops with fakes in gopd_kernels.backends.triton;
- the plain-torch backend: its row loops select valid rows with data-dependent ``nonzero``, which
  cannot be traced, so under compile it is called through the custom ops below (``gopd_torch::``),
  opaque like the kernels (``torch_backend_ops``).
Every row op's statistics are [NSTATS, N] float64 here (the CPU kernels' own; the others up-cast,
O(N)); the backward ops only write into ``out``. tests/test_compile.py checks the fakes against the
real ops (torch.library.opcheck) and a compiled step against eager.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from .backends import NSTATS


def _stats_like(zs):
    return zs.new_empty((NSTATS, zs.shape[0]), dtype=torch.float64)


def register_fakes() -> None:
    """Fakes for the extension's ops, once their schemas are defined (idempotent)."""
    if getattr(register_fakes, "done", False):
        return

    @torch.library.register_fake("gopd::rows_forward")
    def _rows_forward(zs, zt, zr, targets, ts, tt, tr, ignore_index):
        return _stats_like(zs)

    @torch.library.register_fake("gopd::rows_backward")
    def _rows_backward(zs, zt, zr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out):
        return None

    @torch.library.register_fake("gopd::rows_forward_backward")
    def _rows_forward_backward(zs, zt, zr, targets, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out):
        return _stats_like(zs)

    register_fakes.done = True


@torch.library.custom_op("gopd_torch::rows_forward", mutates_args=())
def _torch_rows_forward(zs: torch.Tensor, zt: Optional[torch.Tensor], zr: Optional[torch.Tensor],
                        targets: torch.Tensor, ts: float, tt: float, tr: float, ignore_index: int) -> torch.Tensor:
    from .backends import torch as backend

    return backend.rows_forward(zs, zt, zr, targets, ts, tt, tr, ignore_index).to(torch.float64)


@_torch_rows_forward.register_fake
def _(zs, zt, zr, targets, ts, tt, tr, ignore_index):
    return _stats_like(zs)


@torch.library.custom_op("gopd_torch::rows_backward", mutates_args=("out",))
def _torch_rows_backward(zs: torch.Tensor, zt: Optional[torch.Tensor], zr: Optional[torch.Tensor],
                         targets: torch.Tensor, stats: torch.Tensor, g_lp: torch.Tensor, g_loss: torch.Tensor,
                         lam: float, ts: float, tt: float, tr: float, ignore_index: int, out: torch.Tensor) -> None:
    from .backends import torch as backend

    backend.rows_backward(zs, zt, zr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out)


@_torch_rows_backward.register_fake
def _(zs, zt, zr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out):
    return None


def _backward_then_out(*args):
    torch.ops.gopd_torch.rows_backward(*args)
    return args[-1]


# The torch backend as torch.compile sees it: the same contract, through the opaque ops above.
torch_backend_ops = SimpleNamespace(rows_forward=torch.ops.gopd_torch.rows_forward,
                                    rows_backward=_backward_then_out)
