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


class GOPDHead(torch.nn.Module):
    """The student's LM head with the fused G-OPD loss as its forward: the recipe for DDP and FSDP2.

    ``head = GOPDHead(model.lm_head, lam=1.25, mode="full")``, then
    ``out = head(hidden, targets, teacher_hidden, ref_hidden, teacher_weight=..., ref_weight=...)``
    returns the GOPDOutput of :func:`gopd_kernels.fused_linear_gopd_loss` on ``hidden`` [..., D] and
    ``lm_head.weight`` [V, D] (and its bias), never materialising [N, V] logits.

    Why a module: FSDP2 gathers a sharded parameter only inside the forward of the module it was
    sharded with, so the loss must be computed there: ``fully_shard(head)`` before ``fully_shard(model)``
    makes the head its own FSDP unit, gathered for this forward and resharded after. Under DDP, calling
    the head through the DDP-wrapped model's forward keeps the usual contract.

    Teacher / reference: their hidden states per call; their LM heads either per call
    (``teacher_weight=`` ...) or held here (``teacher_head=``, ``ref_head=``: frozen nn.Linear modules,
    read in forward, so FSDP2 gathers them too when they are sharded with this module).

    The global token-mean: with ``reduction="mean"`` and no ``num_items_in_batch``, when a process
    group is initialised (``global_mean=True``, the default), the denominator is the valid-token count
    over all ranks divided by the world size (:func:`gopd_kernels.distributed.global_num_items`), which
    gives every rank the gradient share of the global token-mean under DDP's / FSDP2's gradient
    averaging; one all-reduce per call. Under gradient accumulation pass
    ``num_items_in_batch=global_num_items([targets of every micro-batch])`` instead.
    """

    def __init__(self, lm_head: torch.nn.Linear, *, teacher_head=None, ref_head=None, global_mean=True,
                 **options):
        super().__init__()
        for name, head in (("lm_head", lm_head), ("teacher_head", teacher_head), ("ref_head", ref_head)):
            if head is not None and not isinstance(getattr(head, "weight", None), torch.Tensor):
                raise TypeError(f"{name}: expected a module with a [V, D] .weight (an nn.Linear), "
                                f"got {type(head).__name__}")
        self.lm_head, self.teacher_head, self.ref_head = lm_head, teacher_head, ref_head
        self.global_mean = bool(global_mean)
        self.options = options

    def forward(self, hidden, targets, teacher_hidden=None, ref_hidden=None, *, teacher_weight=None,
                ref_weight=None, teacher_bias=None, ref_bias=None, **overrides):
        from .distributed import global_num_items

        options = {**self.options, **overrides}
        if teacher_weight is None and self.teacher_head is not None and teacher_hidden is not None:
            teacher_weight, teacher_bias = self.teacher_head.weight, getattr(self.teacher_head, "bias", None)
        if ref_weight is None and self.ref_head is not None and ref_hidden is not None:
            ref_weight, ref_bias = self.ref_head.weight, getattr(self.ref_head, "bias", None)
        if (self.global_mean and options.get("reduction", "mean") == "mean"
                and options.get("num_items_in_batch") is None and torch.distributed.is_available()
                and torch.distributed.is_initialized()):
            options["num_items_in_batch"] = global_num_items(targets, ignore_index=options.get("ignore_index", -100))
        return fused_linear_gopd_loss(hidden, self.lm_head.weight, targets, teacher_hidden, teacher_weight,
                                      ref_hidden, ref_weight, student_bias=getattr(self.lm_head, "bias", None),
                                      teacher_bias=teacher_bias, ref_bias=ref_bias, **options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
