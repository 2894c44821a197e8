"""Input checks: every bad argument gets an error naming it and what was expected."""

from __future__ import annotations

import math
import os
import sys
from numbers import Real

import torch

from ._options import ADVANTAGE_FROM, IMPLS, MODES, REDUCTIONS, SEQUENCE_REDUCTIONS, Options

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def math_dtype(*tensors):
    """The dtype rule, the same for every op (gopd_loss, fused_linear_gopd_loss, fused_linear_logprobs).

    The floating inputs that carry the vocabulary (logits; hidden states, LM-head weights and biases)
    may be float16, bfloat16, float32 or float64 in any mix: 16-bit hidden states beside an fp32 head
    (what torch.autocast produces), a bf16 teacher beside an fp32 student, and so on. The math dtype
    is float64 if any of them is float64, else float32. Every input is read exactly in it (up-cast,
    never rounded down); logits are computed, soft-maxed and accumulated in it (torch.autocast is
    switched off for them), the results (loss, diagnostics, log-probs) are in it, per-token inputs
    (teacher_logprobs, old_logprobs, ...) are converted to it, and each gradient comes back in its
    own input's dtype. Returns the math dtype of the given tensors (None entries are skipped).
    """
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def common_dtype(*tensors):
    """The dtype logits handed to a row kernel share: torch.promote_types of the given ones (so three
    bf16 logits stay bf16, read in fp32 by the kernel, while bf16 beside fp32 becomes fp32: the
    16-bit one is up-cast, never the other way round)."""
    dtypes = [t.dtype for t in tensors if t is not None]
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def compiling() -> bool:
    """True while torch.compile traces. A check that reads a tensor's values (bool(), .item()) would
    break the graph there, so under compile such checks become torch._assert_async: the same
    condition, evaluated when the compiled step runs, raising RuntimeError with a shorter message (on
    CUDA at a later synchronisation, and it leaves the CUDA context unusable: run a failing step
    eagerly to get the full error). Checks on shapes, dtypes and Python values run unchanged."""
    return torch.compiler.is_compiling()


def _is_dtensor(x):
    # A DTensor exists only once its module is imported; importing it here would cost seconds.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def tensor(name, x, *, floating=True, ndim_min=1):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if _is_dtensor(x):
        # FSDP2 keeps parameters sharded outside their module's forward. Running on a shard would be
        # wrong, and .full_tensor() is a copy through which the LM head's gradient comes out wrong.
        raise TypeError(
            f"{name} is a DTensor (a sharded parameter: FSDP2 gathers it only inside its module's forward); "
            "compute the loss inside a forward: wrap the LM head in gopd_kernels.GOPDHead and fully_shard "
            "that module (or register the method that calls the loss with "
            "torch.distributed.fsdp.register_fsdp_forward_method). Passing .full_tensor() instead is no fix: "
            "the LM head's gradient comes out wrong")
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


def options(*, mode, lam, reduction, clip_eps, clip_eps_high, dual_clip, is_cap, temperature, ignore_index,
            num_items_in_batch=None, num_sequences_in_batch=None, advantage_from="current",
            impl="auto") -> Options:
    """The call's Options, every scalar keyword checked once (errors name the keyword)."""
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
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if advantage_from not in ADVANTAGE_FROM:
        raise ValueError(f"advantage_from: expected one of {ADVANTAGE_FROM}, got {advantage_from!r}")
    if advantage_from == "old" and mode != "sampled":
        raise ValueError(f"advantage_from='old' applies to mode='sampled' (the only mode with an advantage), "
                         f"got mode={mode!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"num_items_in_batch is only used with reduction='mean', got reduction={reduction!r}"
                         + ("; a sequence reduction takes num_sequences_in_batch" if reduction in SEQUENCE_REDUCTIONS
                            else ""))
    if num_sequences_in_batch is not None and reduction not in SEQUENCE_REDUCTIONS:
        raise ValueError(f"num_sequences_in_batch is only used with reduction in {SEQUENCE_REDUCTIONS}, got "
                         f"reduction={reduction!r}")
    denominator = num_items_in_batch if num_sequences_in_batch is None else num_sequences_in_batch
    _positive_count("num_items_in_batch" if num_sequences_in_batch is None else "num_sequences_in_batch",
                    denominator, "token count" if num_sequences_in_batch is None else "sequence count")
    return Options(mode=mode, lam=float(lam), temps=temperatures(temperature), ignore_index=int(ignore_index),
                   reduction=reduction, clip_eps=clip_eps, clip_eps_high=clip_eps if clip_eps_high is None
                   else clip_eps_high, dual_clip=dual_clip, is_cap=is_cap, advantage_from=advantage_from,
                   denominator=denominator, impl=impl)


def _positive_count(name, count, what):
    if count is None:
        return
    if isinstance(count, torch.Tensor):
        if count.numel() != 1:
            raise ValueError(f"{name}: expected one {what}, got shape {tuple(count.shape)}")
        if compiling():
            torch._assert_async(count > 0, f"{name}: expected a positive {what}")
            return
        if not _reads_device_values(count):
            return  # its value stays on the device: reading it would synchronise every call
        value = count.item()
    else:
        value = count
    if not isinstance(value, Real) or not value > 0:
        raise ValueError(f"{name}: expected a positive {what}, got {count!r}")


def sequences(reduction, targets):
    """A sequence reduction needs targets [..., T]: the leading dims index the sequences."""
    if reduction in SEQUENCE_REDUCTIONS and targets.dim() < 2:
        raise ValueError(f"targets: reduction={reduction!r} needs targets of shape [..., T] with at least 2 dims "
                         f"(the leading dims index the sequences, the last one their tokens), got shape "
                         f"{tuple(targets.shape)}")


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
    if compiling():
        torch._assert_async(~bad.any(), f"targets: a token id is out of range [0, {vocab_size}) and is not "
                                        f"ignore_index={ignore_index}")
        return
    if bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(f"targets: token id {first} is out of range [0, {vocab_size}) and is not "
                         f"ignore_index={ignore_index}")


def policy_logprobs(mode, advantage_from, old_logprobs):
    """old_logprobs: sampled mode only; advantage_from='old' needs them."""
    if mode != "sampled" and old_logprobs is not None:
        raise ValueError(f"old_logprobs: PPO ratio clipping applies to mode='sampled' only; "
                         f"mode={mode!r} is strictly on-policy")
    if advantage_from == "old" and old_logprobs is None:
        raise ValueError("advantage_from='old' takes the advantage from old_logprobs: pass old_logprobs")
