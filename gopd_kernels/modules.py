"""nn.Module wrappers that hold the loss options, for trainers that want a loss object."""

from __future__ import annotations

import torch

from .api import fused_linear_gopd_loss, gopd_loss


class GOPDLoss(torch.nn.Module):
    """``GOPDLoss(lam=1.25, mode="full")(student_logits, targets, teacher_logits, ref_logits)``.

    Keywords given at construction are the defaults of every call; keywords given to forward
    override them. Returns the GOPDOutput of :func:`gopd_kernels.gopd_loss`.
    """

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, student_logits, targets, teacher_logits=None, ref_logits=None, **overrides):
        return gopd_loss(student_logits, targets, teacher_logits, ref_logits, **{**self.options, **overrides})

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedLinearGOPDLoss(GOPDLoss):
    """``FusedLinearGOPDLoss(lam=1.25)(student_hidden, student_weight, targets, teacher_hidden, ...)``;
    see :func:`gopd_kernels.fused_linear_gopd_loss`."""

    def forward(self, student_hidden, student_weight, targets, teacher_hidden=None, teacher_weight=None,
                ref_hidden=None, ref_weight=None, **overrides):
        return fused_linear_gopd_loss(student_hidden, student_weight, targets, teacher_hidden, teacher_weight,
                                      ref_hidden, ref_weight, **{**self.options, **overrides})
