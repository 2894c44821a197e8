"""The frozen models' side of the fused loss: one typed value per micro-batch.

``TeacherInput`` is what the loss gets from the teacher, in one of three forms (a co-located teacher's
hidden states + LM head, a served teacher's log-probs of the sampled tokens, or a top-k); ``HeadInput`` is
the reference's hidden states + LM head. ``frozen_inputs`` computes both for a micro-batch; the trainer
computes them once per batch, as those models do not change during a step. All tensors are over the N
response tokens of the micro-batch, in batch order (the layout of gopd.scoring.targets_of).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional

import torch

from .models import lm_head
from .prompt_scoring import topk_of_hidden
from .scoring import response_hidden
from .serving.served_teacher import ServedTeacher


@dataclass(frozen=True)
class HeadInput:
    """A frozen model scored through its own LM head inside the loss: hidden [N, D] (in the head's dtype),
    weight [V', D], bias [V'] or None; the loss computes the logits chunk by chunk."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class TeacherInput:
    """The teacher's side of one micro-batch's loss, exactly one of:
      head                                   a co-located teacher in mode full / sampled;
      logprobs [N]                           log p_t(y_j) of the sampled tokens: a served teacher, mode sampled;
      topk_ids [N, k] + topk_logprobs [N, k] mode topk (a served teacher's, or a co-located head's)."""

    head: Optional[HeadInput] = None
    logprobs: Optional[torch.Tensor] = None
    topk_ids: Optional[torch.Tensor] = None
    topk_logprobs: Optional[torch.Tensor] = None

    def loss_kwargs(self) -> dict:
        """The teacher's keywords of gopd_kernels.fused_linear_gopd_loss."""
        return dict(_head_kwargs("teacher_", self.head), teacher_logprobs=self.logprobs,
                    teacher_topk_ids=self.topk_ids, teacher_topk_logprobs=self.topk_logprobs)


@dataclass(frozen=True)
class FrozenInputs:
    """The teacher's and the reference's side of one micro-batch's loss (reference None: it cancels)."""

    teacher: TeacherInput
    reference: Optional[HeadInput] = None

    def loss_kwargs(self) -> dict:
        return dict(self.teacher.loss_kwargs(), **_head_kwargs("ref_", self.reference))


def _head_kwargs(prefix: str, head: Optional[HeadInput]) -> dict:
    if head is None:
        return {f"{prefix}hidden": None, f"{prefix}weight": None, f"{prefix}bias": None}
    return {f"{prefix}hidden": head.hidden, f"{prefix}weight": head.weight, f"{prefix}bias": head.bias}


@torch.no_grad()
def head_input(model, prompts: List[List[int]], responses: List[List[int]], pad_id: int,
               autocast=contextlib.nullcontext) -> HeadInput:
    """`model`'s final hidden states predicting each response token (forward under `autocast`), and its head."""
    with autocast():
        hidden = response_hidden(model, prompts, responses, pad_id)
    weight, bias = lm_head(model)
    return HeadInput(hidden.to(weight.dtype), weight, bias)


@torch.no_grad()
def teacher_input(teacher, prompts: List[List[int]], responses: List[List[int]], *, pad_id: int, mode: str,
                  top_k: int, vocab: int, temperature: float, device, autocast=contextlib.nullcontext
                  ) -> TeacherInput:
    """The TeacherInput of `teacher` (a frozen module or a ServedTeacher) on the responses to its own
    (possibly privileged) `prompts`.

    Served: one request per non-empty response; its top-k in mode topk, else the sampled tokens' log-probs.
    Co-located: its hidden states and head; in mode topk the top-k of log_softmax(logits / temperature)
    over the student's `vocab`, computed in fp32 outside autocast, so it equals what a server reports."""
    if isinstance(teacher, ServedTeacher):
        keep = [i for i, r in enumerate(responses) if r]
        scores = teacher.score([prompts[i] for i in keep], [responses[i] for i in keep])
        if mode == "topk":
            return TeacherInput(topk_ids=torch.cat([s.topk_ids for s in scores]).to(device),
                                topk_logprobs=torch.cat([s.topk_logprobs for s in scores]).to(device))
        return TeacherInput(logprobs=torch.cat([s.actual for s in scores]).to(device))
    head = head_input(teacher, prompts, responses, pad_id, autocast)
    if mode == "topk":
        ids, lps = topk_of_hidden(head.hidden, head.weight, head.bias, top_k, vocab, temperature)
        return TeacherInput(topk_ids=ids, topk_logprobs=lps)
    return TeacherInput(head=head)
