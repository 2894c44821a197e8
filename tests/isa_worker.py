"""Runs the CPU row kernels on every case of a file in one process, whose ISA the caller caps with
GOPD_CPU_ISA (the choice is made once per process): ``python isa_worker.py CASES OUT``.

CASES: {name: dict(logits=(zs, zt, zr), y, temps=(ts, tt, tr), g_lp, g_loss, lam)}. OUT: {name: dict(st, g,
st2, o)}: the statistics and logit gradient of rows_forward + rows_backward, and of rows_forward_backward."""

import sys

import torch

from gopd_kernels.backends import cpu

IGN = -100

cases = torch.load(sys.argv[1])
out = {}
for name, c in cases.items():
    zs, zt, zr = c["logits"]
    args = (c["g_lp"], c["g_loss"], c["lam"], *c["temps"], IGN)
    st = cpu.rows_forward(zs, zt, zr, c["y"], *c["temps"], IGN)
    g = cpu.rows_backward(zs, zt, zr, c["y"], st, *args, torch.empty_like(zs))
    o = torch.empty_like(zs)
    st2 = cpu.rows_forward_backward(zs, zt, zr, c["y"], *args, o)
    out[name] = dict(st=st, g=g, st2=st2, o=o)
torch.save(out, sys.argv[2])
