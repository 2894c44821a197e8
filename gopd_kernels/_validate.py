"""Input checks: every bad argument gets an error naming it and what was expected."""

from __future__ import annotations

import math
import os
from numbers import Real

import torch

MODES = ("sampled", "full")
REDUCTIONS = ("mean", "sum", "none")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name, x, *, floating=True, ndim_min=1):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    if not floating and x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name}: expected an integer dtype (token ids), got {x.dtype}")
    if x.dim() < ndim_min:
        raise ValueError(f"{name}: expected at least {ndim_min} dimension(s), got shape {tuple(x.shape)}")


def same_device(ref_name, ref, **others):
    for name, x in others.items():
        if x is not None and x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; put them on one device")


def per_token(name, x, lead_shape, ref):
    """An optional [...] per-token tensor matching the targets' shape."""
    if x is None:
        return None
    tensor(name, x, ndim_min=0)
    if tuple(x.shape) != tuple(lead_shape):
        raise ValueError(f"{name}: expected shape {tuple(lead_shape)} (one value per token), got {tuple(x.shape)}")
    same_device("targets", ref, **{name: x})
    return x


def temperatures(temperature):
    if isinstance(temperature, (tuple, list)):
        if len(temperature) != 3:
            raise ValueError("temperature: expected a float or a (student, teacher, reference) triple, "
                             f"got {len(temperature)} values")
        temps = tuple(temperature)
    else:
        temps = (temperature,) * 3
    for who, t in zip(("student", "teacher", "reference"), temps):
        if not isinstance(t, Real) or not math.isfinite(float(t)) or float(t) <= 0:
            raise ValueError(f"temperature: the {who} temperature must be a finite number > 0, got {t!r}")
    return tuple(float(t) for t in temps)


def scalars(*, lam, mode, reduction, clip_eps, clip_eps_high, dual_clip, is_cap, num_items_in_batch):
    if not isinstance(lam, Real) or not math.isfinite(float(lam)):
        raise ValueError(f"lam: expected a finite number, got {lam!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(clip_eps, Real) or not 0 <= clip_eps < 1:
        raise ValueError(f"clip_eps: expected a number in [0, 1), got {clip_eps!r}")
    if clip_eps_high is not None and (not isinstance(clip_eps_high, Real) or clip_eps_high < 0):
        raise ValueError(f"clip_eps_high: expected None or a number >= 0, got {clip_eps_high!r}")
    if dual_clip is not None and (not isinstance(dual_clip, Real) or dual_clip <= 1):
        raise ValueError(f"dual_clip: expected None or a number > 1, got {dual_clip!r}")
    if not isinstance(is_cap, Real) or not is_cap > 0:
        raise ValueError(f"is_cap: expected a number > 0 (math.inf for no truncation), got {is_cap!r}")
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError(f"num_items_in_batch is only used with reduction='mean', got reduction={reduction!r}")
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"num_items_in_batch: expected one token count, got shape "
                                 f"{tuple(num_items_in_batch.shape)}")
            if not _reads_device_values(num_items_in_batch):
                return  # its value stays on the device: reading it would synchronise every call
            value = num_items_in_batch.item()
        else:
            value = num_items_in_batch
        if not isinstance(value, Real) or not value > 0:
            raise ValueError(f"num_items_in_batch: expected a positive token count, got {num_items_in_batch!r}")


def models(*, mode, lam, teacher, teacher_logprobs, ref, ref_logprobs, teacher_word="teacher_logits",
           ref_word="ref_logits"):
    """Which of teacher / reference is given, and whether the combination makes sense."""
    if teacher is not None and teacher_logprobs is not None:
        raise ValueError(f"give the teacher as {teacher_word} or as teacher_logprobs, not both")
    if ref is not None and ref_logprobs is not None:
        raise ValueError(f"give the reference as {ref_word} or as ref_logprobs, not both")
    if teacher is None and teacher_logprobs is None:
        raise ValueError(f"a teacher is required: pass {teacher_word} (or teacher_logprobs in sampled mode)")
    if mode == "full" and (teacher_logprobs is not None or ref_logprobs is not None):
        raise ValueError(f"mode='full' needs the whole vocabulary: pass {teacher_word} / {ref_word}, "
                         "not per-token teacher_logprobs / ref_logprobs (those work in mode='sampled')")
    if float(lam) != 1.0 and ref is None and ref_logprobs is None:
        raise ValueError(f"lam={lam} needs a reference model: pass {ref_word} (or ref_logprobs in sampled "
                         "mode); only lam=1 (plain OPD) is independent of the reference")


def vocab(name, v_other, v_student):
    if v_other < v_student:
        raise ValueError(f"{name}: vocabulary size {v_other} is smaller than the student's {v_student}; "
                         "the teacher / reference vocabulary must cover the student's (padding beyond it is cut)")


def _reads_device_values(x) -> bool:
    """Whether a check may read `x`'s values on the host: always for CPU tensors; for GPU tensors only
    with GOPD_SYNC_CHECKS=1 (each read is a host synchronisation, on every call)."""
    return x.device.type == "cpu" or os.environ.get("GOPD_SYNC_CHECKS") == "1"


def targets_in_range(targets, vocab_size, ignore_index):
    """Token ids must be in [0, V) or equal ignore_index. Checked on the host for CPU tensors (and for
    GPU tensors with GOPD_SYNC_CHECKS=1); on a GPU the check would synchronise every call, so there an
    out-of-range id instead gives its token NaN statistics (log-probs, loss): no kernel reads out of
    bounds."""
    if targets.numel() == 0 or not _reads_device_values(targets):
        return
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(f"targets: token id {first} is out of range [0, {vocab_size}) and is not "
                         f"ignore_index={ignore_index}")


def optimizer_like_options(mode, old_logprobs):
    if mode == "full" and old_logprobs is not None:
        raise ValueError("old_logprobs: PPO ratio clipping applies to mode='sampled' only; "
                         "mode='full' is strictly on-policy")
