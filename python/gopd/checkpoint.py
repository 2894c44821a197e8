"""Atomic checkpoints: a fault while writing never loses the previous checkpoint.

One process: one file, ``checkpoint.pt`` (torch.save), written to a temp file in the same folder and
renamed over the old one.

Under torchrun: ``torch.distributed.checkpoint`` (DCP), sharded: every rank writes its own FSDP2 shards of
the student's weights and AdamW state. A checkpoint is the folder ``checkpoints/step-NNNNNN``; it is written
as ``checkpoints/.step-NNNNNN.tmp``, renamed once every rank has finished writing, and only then named in
``checkpoints/LATEST`` (a one-line file replaced atomically); older step folders are deleted after that. A
crash at any point leaves LATEST naming a complete checkpoint. The replicated state (step, bad-step count,
LR scheduler) is stored once; each rank's RNG state under its own key.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import tempfile

import torch

SHARDED_DIR = "checkpoints"
LATEST = "LATEST"


def save(path: str, *, model, optimizer, scheduler, step: int, bad_steps: int) -> None:
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                 step=step, bad_steps=bad_steps, torch_rng=torch.get_rng_state(), python_rng=random.getstate())
    atomic_save(state, path)


def atomic_save(obj, path: str) -> None:
    """torch.save(obj) to `path` through a temp file in the same folder and a rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_write(path, lambda fh: torch.save(obj, fh), "wb", ".ckpt-")


def _atomic_write(path: str, write, mode: str, prefix: str) -> None:
    """write(file) into a temp file beside `path`, fsync, rename over `path`; the temp file goes on failure."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(path: str, *, model, optimizer, scheduler) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state


# ----------------------------------------------------------------------------------- sharded (torchrun)

def latest_sharded(run_dir: str):
    """The folder of the newest complete sharded checkpoint under run_dir, or None."""
    pointer = os.path.join(run_dir, SHARDED_DIR, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as fh:
        name = fh.read().strip()
    folder = os.path.join(run_dir, SHARDED_DIR, name)
    if not name or not os.path.isdir(folder):
        raise FileNotFoundError(f"{pointer} names {name!r}, which is not a checkpoint folder in "
                                f"{os.path.dirname(pointer)}")
    return folder


def _rng_key(rank: int) -> str:
    return f"rng_rank{rank}"


def _write_atomic(path: str, text: str) -> None:
    _atomic_write(path, lambda fh: fh.write(text), "w", ".latest-")


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_sharded(run_dir: str, *, model, optimizer, scheduler, step: int, bad_steps: int) -> str:
    """Collective (every rank calls it): writes checkpoints/step-{step:06d} as described in the module doc.

    model: the FSDP2 root module (its state dict keys are the checkpoint's); optimizer: the student's.
    Returns the checkpoint folder."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank()
    root = os.path.join(run_dir, SHARDED_DIR)
    name = f"step-{step:06d}"
    tmp, final = os.path.join(root, f".{name}.tmp"), os.path.join(root, name)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run that died while writing
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    meta = pickle.dumps(dict(step=step, bad_steps=bad_steps, scheduler=scheduler.state_dict(),
                             world_size=dist.get_world_size()))
    rng = pickle.dumps(dict(torch_rng=torch.get_rng_state(), python_rng=random.getstate()))
    # pickled bytes are one opaque leaf each: DCP would otherwise flatten nested dicts and lists
    dcp.save({"model": model_sd, "optimizer": optim_sd, "meta": meta, _rng_key(rank): rng}, checkpoint_id=tmp)
    # dcp.save returns on every rank only after rank 0 wrote the metadata, i.e. all shards are on disk.
    if rank == 0:
        if os.path.exists(final):  # written by an earlier run that died before naming it in LATEST
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic(os.path.join(root, LATEST), name + "\n")
        for other in os.listdir(root):
            if other.startswith("step-") and other != name:
                shutil.rmtree(os.path.join(root, other), ignore_errors=True)
    dist.barrier()
    return final


def load_sharded(folder: str, *, model, optimizer, scheduler) -> dict:
    """Collective: loads a save_sharded checkpoint into the FSDP2 root `model`, its `optimizer` and
    `scheduler`; restores this rank's RNG state when the checkpoint has one for this rank (same world
    size). Returns dict(step, bad_steps, world_size, rng_restored)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    rank = dist.get_rank()
    saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd, "meta": b""}
    has_rng = _rng_key(rank) in saved
    if has_rng:
        state[_rng_key(rank)] = b""
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    meta = pickle.loads(state["meta"])
    scheduler.load_state_dict(meta["scheduler"])
    if has_rng:
        rng = pickle.loads(state[_rng_key(rank)])
        torch.set_rng_state(rng["torch_rng"])
        random.setstate(rng["python_rng"])
    return dict(step=meta["step"], bad_steps=meta["bad_steps"], world_size=meta["world_size"],
                rng_restored=has_rng)
