"""C++ CPU backend: the row kernels of ``csrc/cpu/`` (OpenMP over rows, one vectorised pass over the
vocabulary per row, fp32 accumulation, fp64 for fp64 input), called through
``torch.ops.gopd.rows_forward`` / ``rows_backward`` registered by the extension ``gopd_kernels._C``.

Supports float16, bfloat16, float32 and float64 logits on CPU; the statistics are float64 for every
input dtype (the backward splits each lse into two floats). See ``gopd_kernels.backends`` for the
contract (stats layout, conventions for -inf columns and masked rows).
"""

from __future__ import annotations

import torch

from .. import _extension

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_state: dict = {}


def available():
    if "ok" not in _state:
        try:
            _extension.load()  # importing it registers torch.ops.gopd.* for CPU; built on first use if need be
        except (ImportError, OSError) as exc:
            _state["ok"], _state["why"] = False, _extension.not_built_message(exc)
            return _state["ok"], _state["why"]
        try:
            torch.ops.gopd.rows_forward  # noqa: B018  (the schema must be registered)
            _state["ok"], _state["why"] = True, ""
        except (AttributeError, RuntimeError) as exc:
            _state["ok"], _state["why"] = False, f"torch.ops.gopd.rows_forward is not registered ({exc})"
    return _state["ok"], _state["why"]


def _require():
    ok, why = available()
    if not ok:
        raise RuntimeError(f"backend='cpu': {why}")


def _check_cpu(**tensors):
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"backend='cpu': {name} must be a CPU tensor, got device {t.device}")


def _check_dtype(zs):
    if zs.dtype not in DTYPES:
        raise TypeError(f"backend='cpu' does not support dtype {zs.dtype} (expected one of {DTYPES})")


def rows_forward(zs, zt, zr, targets, ts, tt, tr, ignore_index):
    _require()
    _check_cpu(zs=zs, zt=zt, zr=zr, targets=targets)
    _check_dtype(zs)
    return torch.ops.gopd.rows_forward(zs, zt, zr, targets, float(ts), float(tt), float(tr), int(ignore_index))


def rows_backward(zs, zt, zr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out):
    _require()
    _check_cpu(zs=zs, zt=zt, zr=zr, targets=targets, stats=stats, g_lp=g_lp, g_loss=g_loss, out=out)
    _check_dtype(zs)
    torch.ops.gopd.rows_backward(zs, zt, zr, targets, stats, g_lp, g_loss, float(lam), float(ts), float(tt),
                                 float(tr), int(ignore_index), out)
    return out


def rows_forward_backward(zs, zt, zr, targets, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out):
    """rows_forward, then rows_backward with these (g_lp, g_loss) into out, one row at a time (each
    row's backward reads the logits its forward has just brought into cache); returns the stats."""
    _require()
    _check_cpu(zs=zs, zt=zt, zr=zr, targets=targets, g_lp=g_lp, g_loss=g_loss, out=out)
    _check_dtype(zs)
    return torch.ops.gopd.rows_forward_backward(zs, zt, zr, targets, g_lp, g_loss, float(lam), float(ts),
                                                float(tt), float(tr), int(ignore_index), out)
