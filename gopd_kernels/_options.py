"""The names every layer shares (modes, reductions, implementations) and the validated options of one call.

``Options`` is built once per call by ``gopd_kernels._validate.options`` from the public keywords and
passed down unchanged (api -> autograd -> objective); nothing below the API re-reads a keyword.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

MODES = ("sampled", "full", "topk")
# The row-kernel backends (gopd_kernels/backends/<name>.py); "auto" picks one per device.
BACKENDS = ("torch", "cpu", "cuda", "triton")
# "mean" is the token mean over the batch; the seq-mean-* reductions (verl's names) first reduce each
# sequence (the last dim of targets) by its token mean or token sum, then average over sequences.
REDUCTIONS = ("mean", "sum", "none", "seq-mean-token-mean", "seq-mean-token-sum")
SEQUENCE_REDUCTIONS = ("seq-mean-token-mean", "seq-mean-token-sum")
# Where the sampled mode's advantage takes the student's log-prob from: the current policy (lp_s,
# detached) or the policy that sampled (old_logprobs), as the paper authors' verl code does. On-policy
# the two are the same.
ADVANTAGE_FROM = ("current", "old")
# How the fused-linear ops form the logits: "chunked" writes each chunk's [chunk, V] logits and runs the
# backend's row kernels on them; "onchip" keeps the logit tiles in registers (Triton only); "auto" is
# "chunked" unless this device's tuning table (gopd_kernels/tuning.json) measured "onchip" faster for the
# call's use and shape class and the call is one the on-chip kernels take.
IMPLS = ("auto", "chunked", "onchip")


@dataclass(frozen=True)
class Options:
    """Every scalar option of one call, validated.

    temps: (student, teacher, reference) temperatures. clip_eps_high: resolved (clip_eps when not given).
    dual_clip: None = off. denominator: num_items_in_batch (token reductions) or num_sequences_in_batch
    (sequence reductions), or None for the local count."""

    mode: str
    lam: float
    temps: tuple
    ignore_index: int
    reduction: str
    clip_eps: float
    clip_eps_high: float
    dual_clip: Optional[float]
    is_cap: float
    advantage_from: str = "current"
    denominator: Optional[Union[float, torch.Tensor]] = None
    impl: str = "auto"
