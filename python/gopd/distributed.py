"""Process group and rank helpers for the trainer under torchrun (docs/scaling.md).

A run is distributed exactly when torchrun launched it with more than one process (WORLD_SIZE > 1 in the
environment); a plain ``gopd train`` stays one process and touches nothing here beyond ``World.single()``.
The backend follows the device: NCCL for CUDA, gloo for CPU. Each rank drives one device: under torchrun a
CUDA config device becomes ``cuda:LOCAL_RANK``.

Data parallelism as the trainer uses it: the global batch of B prompts is split into W contiguous shares
(``share``); the student is sharded with FSDP2, which *averages* gradients over ranks, so every rank divides
its token-loss sum by N_global / W (N_global = response tokens of the step over all ranks) and the averaged
gradient is that of the global token-mean sum_i loss_i / N_global, as in one process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank in [0, size); size 1 is the single-process trainer."""

    rank: int = 0
    size: int = 1

    @staticmethod
    def single() -> "World":
        return World()

    @staticmethod
    def current() -> "World":
        if dist.is_available() and dist.is_initialized():
            return World(dist.get_rank(), dist.get_world_size())
        return World()

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes metrics, logs, plots, the config and the final model."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment says this is one of several torchrun processes (WORLD_SIZE > 1)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw) > 1
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an integer (set by torchrun), got {raw!r}") from None


def backend_for(device: str) -> str:
    """NCCL for a CUDA device, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_device(device: str) -> str:
    """The device this rank drives: ``cuda:LOCAL_RANK`` for a CUDA config device under torchrun, else as given."""
    if torch.device(device).type == "cuda" and launched_by_torchrun():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


@contextlib.contextmanager
def process_group(device: str):
    """Initialises the default process group when launched by torchrun with WORLD_SIZE > 1 (and none is up),
    destroys it on exit; yields the World. One process: yields World.single() and does nothing."""
    owned = False
    if launched_by_torchrun() and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError("launched by torchrun (WORLD_SIZE > 1), but this torch build has no "
                               "torch.distributed")
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(local_device(device)))
        dist.init_process_group(backend_for(device))
        owned = True
    try:
        yield World.current()
    finally:
        if owned:
            dist.destroy_process_group()


def share(n: int, world: World) -> range:
    """The indices of a global batch of n items that this rank takes: W contiguous blocks, the first
    n mod W of them one longer (sizes differ by at most one; every rank gets >= 1 item when n >= W)."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return range(start, start + base + (world.rank < extra))


def all_reduce(values: Sequence[float], op: str = "sum", device="cpu") -> List[float]:
    """The element-wise sum / max / min of a few floats over all ranks (float64, one collective);
    the values themselves without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op: expected one of {sorted(ops)}, got {op!r}")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=ops[op])
    return t.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_replicas_agree(name: str, module: torch.nn.Module, device="cpu") -> None:
    """Raises when ``module``'s weights differ between ranks. FSDP2 keeps each rank's shard of that rank's
    own copy, and frozen models are replicated, so every rank must build the same weights (same seed,
    same files); a cheap fingerprint (sum and sum of squares of all parameters, float64) catches a rank
    that did not."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        s = sum((p.detach().double().sum() for p in module.parameters()), torch.zeros((), dtype=torch.float64))
        q = sum((p.detach().double().square().sum() for p in module.parameters()),
                torch.zeros((), dtype=torch.float64))
    local = [float(s), float(q)]
    hi, lo = all_reduce(local, "max", device), all_reduce(local, "min", device)
    if hi != lo:
        raise RuntimeError(f"{name}: the ranks built different weights (fingerprints {lo} .. {hi}); every rank "
                           "must load the same model (same seed or files)")
