"""Reusable CPU scratch for the fused-linear path's [chunk, V] logits buffers.

A fused-linear call needs one fp32 [chunk, V] buffer per head (96 MiB each at SmolLM2 shapes with the
default chunk). Fresh from the allocator, such a buffer is page-faulted in by the OS on its first
write: on this project's 2-core benchmark machine about 20-40 ms per buffer, 0.06-0.12 s per call
with three heads, which is 3-5% of an N=2048 step and more at small N. So the buffers of one call are
kept for the next, as CUDA's caching allocator keeps GPU memory: at most CAPACITY_BYTES in all (the
default CPU chunk budget), largest first. `release_workspace()` frees them.

Concurrent calls never share a buffer: a call takes buffers out of the pool and puts them back when
it is done, so a second call running meanwhile allocates its own.
"""

from __future__ import annotations

import threading

import torch

CAPACITY_BYTES = 320 << 20

_pool: list[torch.Tensor] = []  # flat 1-D CPU tensors, no one else holds a reference
_lock = threading.Lock()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def take(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat CPU tensor of at least `numel` elements of `dtype`: the smallest pooled one that fits,
    else a new one. Its contents are undefined."""
    with _lock:
        fits = [i for i, b in enumerate(_pool) if b.dtype == dtype and b.numel() >= numel]
        if fits:
            return _pool.pop(min(fits, key=lambda i: _pool[i].numel()))
    return torch.empty(numel, dtype=dtype)


def give_back(buffers) -> None:
    """Return buffers from `take` (the caller keeps no view of them); the pool keeps the largest that
    fit in CAPACITY_BYTES together and drops the rest."""
    with _lock:
        candidates = sorted([*_pool, *buffers], key=_nbytes, reverse=True)
        kept, total = [], 0
        for b in candidates:
            if total + _nbytes(b) <= CAPACITY_BYTES:
                kept.append(b)
                total += _nbytes(b)
        _pool[:] = kept


def cached_bytes() -> int:
    """Bytes held by the pool between calls."""
    with _lock:
        return sum(_nbytes(b) for b in _pool)


def release_workspace() -> None:
    """Free the CPU scratch that fused-linear calls keep between calls (at most 320 MiB)."""
    with _lock:
        _pool.clear()
