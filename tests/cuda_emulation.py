"""The CUDA row kernels' math on the host, for tests where there is no GPU.

csrc/cuda/emulate_rows.cuh compiles the kernels' own row code (RowState, write_row_stats,
make_row_const, column_grad) for the host with nvcc and replays the forward's thread layout
sequentially; `Emulated` exposes it with the backend contract (rows_forward / rows_backward) on CPU
tensors. Used by tests/test_cuda_backend.py and by the cross-backend tests of tests/test_backends.py.
"""

import ctypes
import os
import pathlib
import shutil
import subprocess

import torch

from gopd_kernels._layout import NSTATS

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def nvcc():
    found = os.environ.get("NVCC") or shutil.which("nvcc")
    if not found and os.environ.get("CUDA_HOME"):
        cand = pathlib.Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        found = str(cand) if cand.exists() else None
    return found


def build(directory):
    """Compile the emulation into `directory`; returns an Emulated, or raises with nvcc's message."""
    lib = pathlib.Path(directory) / "libgopd_emu.so"
    cmd = [nvcc(), "-O2", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-I", str(_ROOT / "csrc"), "-x", "cu",
           str(_ROOT / "csrc" / "cuda" / "emulate_rows.cuh"), "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed on the host emulation:\n{res.stderr[-4000:]}")
    return Emulated(ctypes.CDLL(str(lib)))


class Emulated:
    """The row contract on CPU tensors through the host build of the kernels' row math."""

    def __init__(self, lib):
        self.lib = lib

    def _models(self, zs, zt, zr, ts, tt, tr):
        orig = [z for z in (zs, zt, zr) if z is not None]
        ms = [(z.float(), float(t), i) for i, (z, t) in enumerate(((zs, ts), (zt, tt), (zr, tr))) if z is not None]
        nm = len(ms)
        strides = [z.stride(0) if z.shape[0] > 1 else z.shape[1] for z, _, _ in ms]

        def aligned(z):  # as the launcher decides, on the tensor in its own dtype
            row = (z.stride(0) if z.shape[0] > 1 else z.shape[1]) * z.element_size()
            return z.data_ptr() % 16 == 0 and row % 16 == 0

        vec = any(aligned(z) for z in orig)  # the forward's chunked path: some model is aligned
        return (nm, (ctypes.c_void_p * nm)(*[z.data_ptr() for z, _, _ in ms]), (ctypes.c_int64 * nm)(*strides),
                (ctypes.c_float * nm)(*[t for _, t, _ in ms]), (ctypes.c_int * nm)(*[i for _, _, i in ms]), vec,
                16 // zs.element_size(), ms)

    def rows_forward(self, zs, zt, zr, y, ts, tt, tr, ignore_index):
        n, v = zs.shape
        nm, ptrs, strides, temps, ids, vec, width, _keep = self._models(zs, zt, zr, ts, tt, tr)
        stats = torch.empty(NSTATS, n, dtype=torch.float64)
        y = y.contiguous()
        if n:
            self.lib.emu_forward(nm, ptrs, strides, temps, ids, ctypes.c_void_p(y.data_ptr()), ctypes.c_int64(n),
                                 ctypes.c_int64(v), ctypes.c_int64(ignore_index), ctypes.c_void_p(stats.data_ptr()),
                                 int(vec), width)
        return stats

    def rows_backward(self, zs, zt, zr, y, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out):
        n, v = zs.shape
        nm, ptrs, strides, temps, ids, _vec, _width, _keep = self._models(zs, zt, zr, ts, tt, tr)
        stats = stats.double().contiguous()
        g_lp, g_loss = (t.float().contiguous() for t in (g_lp, g_loss))
        y = y.contiguous()
        o = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32)
        if n and v:
            p = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
            self.lib.emu_backward(nm, ptrs, strides, temps, ids, p(y), p(stats), p(g_lp), p(g_loss), ctypes.c_int64(n),
                                  ctypes.c_int64(v), ctypes.c_float(lam), ctypes.c_int64(ignore_index), p(o),
                                  ctypes.c_int64(o.stride(0) if n > 1 else v))
        if o is not out:
            out.copy_(o)
        return out
