"""Vocab-parallel heads (gopd_kernels/vocab_parallel.py): 2 and 3 gloo ranks on CPU, uneven slices.

Each rank holds its slice of every head's vocabulary; the sharded op must give, on every rank, the loss
and diagnostics of the single-device op on the whole heads, the full hidden-state gradient, and the
gradient of its own weight / bias slice, within rounding, for every mode, reduction, dtype and CPU
backend; and fused_linear_logprobs likewise. The single-device op is itself tested against the
reference elsewhere; here the float64 case is also checked against gopd_kernels.reference directly.
"""

import itertools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gopd_kernels as gk
from gopd_kernels import reference as R

from helpers import BACKENDS, device_for, interpreted

N, V, DS, DT, DR = 13, 23, 6, 5, 7
SLICES = {2: (9, 14), 3: (5, 11, 7)}
DIAGS = ("lp_s", "lp_t", "lp_r", "reward", "kl", "advantage", "entropy")
# The backends whose tensors live on the CPU, where gloo runs (Triton's interpreter is left out: too slow
# for several ranks).
CPU_BACKENDS = [b for b in BACKENDS if device_for(b) == "cpu" and not interpreted(b)]


def problem(dtype):
    g = torch.Generator().manual_seed(5)
    hs, ht, hr = (torch.randn(N, d, generator=g, dtype=torch.float64) for d in (DS, DT, DR))
    ws, wt, wr = (torch.randn(V, d, generator=g, dtype=torch.float64) * 0.8 for d in (DS, DT, DR))
    bs = torch.randn(V, generator=g, dtype=torch.float64) * 0.3
    y = torch.randint(0, V, (N,), generator=g)
    y[[2, 7]] = -100
    y[0], y[1] = 0, V - 1  # targets in the first and last slices
    upstream = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    return [t.to(dtype) for t in (hs, ht, hr, ws, wt, wr, bs)] + [y, upstream.to(dtype)]


def run_op(hs, ws, bs, y, ht, wt, hr, wr, upstream, *, mode, reduction, backend, group=None):
    hs = hs.detach().clone().requires_grad_(True)
    ws = ws.detach().clone().requires_grad_(True)
    bs = bs.detach().clone().requires_grad_(True)
    out = gk.fused_linear_gopd_loss(hs, ws, y, ht, wt, hr, wr, student_bias=bs, lam=1.25, mode=mode,
                                    reduction=reduction, backend=backend, chunk_size=5, vocab_parallel_group=group)
    loss = out.loss if reduction != "none" else (out.loss * upstream).sum()
    loss.backward()
    return loss.detach(), {k: getattr(out, k) for k in DIAGS}, hs.grad, ws.grad, bs.grad


def _worker(rank, world, port, cases):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sizes = SLICES[world]
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        for dtype, mode, reduction, backend in cases:
            hs, ht, hr, ws, wt, wr, bs, y, up = problem(dtype)
            # fp32: the slices' statistics are combined in the backend's statistics dtype (fp32 for the torch
            # backend), so agreement is to a few ulps of each quantity's scale, not of each entry.
            tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
            what = f"rank {rank}/{world} {dtype} {mode} {reduction} {backend}"
            whole = run_op(hs, ws, bs, y, ht, wt, hr, wr, up, mode=mode, reduction=reduction, backend=backend)
            split = run_op(hs, ws[lo:hi], bs[lo:hi], y, ht, wt[lo:hi], hr, wr[lo:hi], up, mode=mode,
                           reduction=reduction, backend=backend, group=dist.group.WORLD)
            torch.testing.assert_close(split[0], whole[0], **tol, msg=lambda m, w=f"loss, {what}": f"{w}: {m}")
            for k in DIAGS:
                a, b = split[1][k], whole[1][k]
                if b is None:
                    assert a is None, f"{k}, {what}"
                else:
                    torch.testing.assert_close(a, b, **tol, msg=lambda m, w=f"{k}, {what}": f"{w}: {m}")
            torch.testing.assert_close(split[2], whole[2], **tol, msg=lambda m, w=f"d student_hidden, {what}": f"{w}: {m}")
            torch.testing.assert_close(split[3], whole[3][lo:hi], **tol, msg=lambda m, w=f"d weight slice, {what}": f"{w}: {m}")
            torch.testing.assert_close(split[4], whole[4][lo:hi], **tol, msg=lambda m, w=f"d bias slice, {what}": f"{w}: {m}")
            if dtype == torch.float64 and reduction == "mean":
                zs, zt, zr = hs @ ws.T + bs, ht @ wt.T, hr @ wr.T
                ref = R.gopd_loss(zs, y, zt, zr, lam=1.25, mode=mode).loss
                torch.testing.assert_close(split[0], ref, **tol, msg=lambda m, w=f"loss vs reference, {what}": f"{w}: {m}")
            lp_split = gk.fused_linear_logprobs(hs, ws[lo:hi], y, 0.7, bias=bs[lo:hi], backend=backend,
                                                chunk_size=4, vocab_parallel_group=dist.group.WORLD)
            lp_whole = gk.fused_linear_logprobs(hs, ws, y, 0.7, bias=bs, backend=backend)
            torch.testing.assert_close(lp_split, lp_whole, **tol, msg=lambda m, w=f"fused_linear_logprobs, {what}": f"{w}: {m}")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 3])
def test_split_vocabulary_equals_the_single_device_op(world):
    # Every case on 2 ranks; on 3 (a middle slice that owns neither end) the C++ backend's cases.
    cases = list(itertools.product((torch.float64, torch.float32), ("full", "sampled"), ("mean", "none"),
                                   CPU_BACKENDS if world == 2 else CPU_BACKENDS[:1]))
    mp.spawn(_worker, args=(world, _free_port(), cases), nprocs=world, join=True)


def test_clear_errors_without_a_process_group():
    hs, ht, hr, ws, wt, wr, bs, y, _ = problem(torch.float32)
    with pytest.raises(ValueError, match="vocab_parallel_group: torch.distributed is not initialised"):
        gk.fused_linear_gopd_loss(hs, ws, y, ht, wt, vocab_parallel_group=object())
