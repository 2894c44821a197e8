"""CUDA backend: the row kernels of ``csrc/cuda/rows.cu``, called through
``torch.ops.gopd.rows_forward`` / ``rows_backward`` (CUDA implementations registered by the extension
``gopd_kernels._C`` when it was built against a CUDA torch with nvcc available).

Forward: one vocabulary pass per row (a block per row, a warp per row for V <= 2048): online
logsumexp of z_m / T_m for student / teacher / reference together with the online expectations
E_S, E_T, E_R under p_s, 16-byte vector loads for the models whose rows are aligned, fp32 math with
the per-row statistics combined and stored in fp64. Backward: one pass per row writing d/dz_s, may be
in place (``out is zs``). Supports float32, bfloat16 and float16 logits on CUDA tensors (float64: use
the ``torch`` or ``cpu`` backend). See ``gopd_kernels.backends`` for the contract (stats layout [9, N]
fp64, -inf columns, masked rows, undefined rows).
"""

from __future__ import annotations

import torch

from .. import _extension

_BUILD = "build the extension with `pip install --no-build-isolation -e .` on a machine whose torch has CUDA and nvcc"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_state: dict = {}


def _probe():
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    try:
        _C = _extension.load()
    except (ImportError, OSError) as exc:
        return False, f"{_extension.not_built_message(exc)}; its CUDA kernels need a torch with CUDA and nvcc"
    built = getattr(_C, "built_with_cuda", None)
    if built is None or not built():
        return False, f"the C++ extension was built without its CUDA kernels; {_BUILD}"
    try:
        torch.ops.gopd.rows_forward  # noqa: B018  (the schema must be registered)
    except (AttributeError, RuntimeError) as exc:
        return False, f"torch.ops.gopd.rows_forward is not registered ({exc}); {_BUILD}"
    return True, ""


def available():
    if "ok" not in _state:
        _state["ok"], _state["why"] = _probe()
    return _state["ok"], _state["why"]


def _require():
    ok, why = available()
    if not ok:
        raise RuntimeError(f"backend='cuda': {why}")


def _check(zs, **tensors):
    if zs.dtype not in DTYPES:
        raise TypeError(f"backend='cuda' does not support dtype {zs.dtype} (expected one of {DTYPES})")
    for name, t in dict(zs=zs, **tensors).items():
        if t is None:
            continue
        if t.device.type != "cuda":
            raise ValueError(f"backend='cuda': {name} must be a CUDA tensor, got device {t.device}")
        if t.device != zs.device:
            raise ValueError(f"backend='cuda': {name} is on {t.device}, expected {zs.device} like zs")
        if t.dim() == 2 and t.shape[1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"backend='cuda': {name} needs stride(-1) == 1, got strides {t.stride()}")


def rows_forward(zs, zt, zr, targets, ts, tt, tr, ignore_index):
    _require()
    _check(zs, zt=zt, zr=zr, targets=targets)
    return torch.ops.gopd.rows_forward(zs, zt, zr, targets, float(ts), float(tt), float(tr), int(ignore_index))


def rows_backward(zs, zt, zr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out):
    _require()
    _check(zs, zt=zt, zr=zr, targets=targets, stats=stats, g_lp=g_lp, g_loss=g_loss, out=out)
    torch.ops.gopd.rows_backward(zs, zt, zr, targets, stats, g_lp, g_loss, float(lam), float(ts), float(tt),
                                 float(tr), int(ignore_index), out)
    return out
