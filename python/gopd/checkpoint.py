"""Atomic checkpoints: written to a temp file in the same folder, then renamed over the old one, so a
crash or Ctrl-C mid-write leaves the previous checkpoint intact."""

from __future__ import annotations

import os
import random
import tempfile

import torch


def save(path: str, *, model, optimizer, scheduler, step: int, bad_steps: int) -> None:
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                 step=step, bad_steps=bad_steps, torch_rng=torch.get_rng_state(), python_rng=random.getstate())
    atomic_save(state, path)


def atomic_save(obj, path: str) -> None:
    """torch.save(obj) to `path` through a temp file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ckpt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
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
