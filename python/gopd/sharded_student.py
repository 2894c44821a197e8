"""The student under FSDP2 (torchrun): sharded for training, a full replica for sampling.

FSDP2 gathers a sharded parameter only inside the forward of the module it was sharded with, and the fused
loss must read the full LM head (docs/scaling.md). ``ShardedStudent`` is the root FSDP unit around the
student: its forward computes the student's final hidden states *and* the loss, through
``gopd_kernels.GOPDHead`` on the student's LM head. Each decoder layer is its own FSDP unit; the embeddings,
the final norm and the LM head stay in the root unit, so a head tied to the embeddings (SmolLM2, the tiny
test models) is one parameter gathered once, for the whole forward.

Sampling under FSDP2 would all-gather every layer at every decoded token, in lock-step across ranks whose
responses end at different lengths. The rollouts (and evaluation) therefore run on a plain replica of the
student, refreshed from the shards by ``sync_replica`` after each optimizer step; the same role a vLLM
engine's own copy of the weights plays. Cost: one full copy of the student's weights per rank.
"""

from __future__ import annotations

import contextlib

import torch

import gopd_kernels as gk

from .scoring import base_model, padded, response_hidden


class ShardedStudent(torch.nn.Module):
    """Root FSDP unit: forward(prompts, responses, targets, teacher_hidden, ...) is the student's forward on
    the sequences prompt + response plus ``GOPDHead`` on its [N, D] response hidden states (N = response
    tokens, batch order), returning the GOPDOutput. Every keyword besides ``pad_id`` / ``dummy`` /
    ``sequences`` goes to :func:`gopd_kernels.fused_linear_gopd_loss` (teacher_weight, ref_hidden, lam,
    num_items_in_batch, ...). ``sequences=True``: the hidden states go in as [B, T, D], one response per row
    (gopd.scoring.padded), for the sequence reductions; targets and the per-token inputs are then [B, T, ...].

    ``dummy=True`` returns a zero loss that still touches every trainable parameter: a rank with fewer
    micro-batches than another runs it so that every rank does the same number of forwards and backwards
    (FSDP2's all-gathers and reduce-scatters are collectives), adding exactly 0 to the gradients."""

    def __init__(self, student: torch.nn.Module, autocast=contextlib.nullcontext):
        super().__init__()
        self.student = student
        self.head = gk.GOPDHead(student.get_output_embeddings())
        self._autocast = autocast

    def forward(self, prompts, responses, targets=None, teacher_hidden=None, *, pad_id: int, dummy=False,
                sequences=False, **loss_kwargs):
        with self._autocast():
            hidden = response_hidden(self.student, prompts, responses, pad_id)
        if sequences and not dummy:
            hidden = padded(hidden, [len(r) for r in responses])
        weight = self.head.lm_head.weight
        if dummy:
            zero = hidden.sum() * 0 + weight.sum() * 0
            bias = getattr(self.head.lm_head, "bias", None)
            return zero + bias.sum() * 0 if bias is not None else zero
        return self.head(hidden.to(weight.dtype), targets, teacher_hidden, **loss_kwargs)


def shard_student(student: torch.nn.Module, autocast=contextlib.nullcontext) -> ShardedStudent:
    """Wraps `student` in a ShardedStudent and shards it with FSDP2 (in place: its parameters become DTensor
    shards over the default process group): each decoder layer its own unit, the rest in the root."""
    from torch.distributed.fsdp import fully_shard

    root = ShardedStudent(student, autocast)
    layers = getattr(base_model(student), "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        for layer in layers:
            fully_shard(layer)
    fully_shard(root)
    return root


@torch.no_grad()
def sync_replica(replica: torch.nn.Module, student: torch.nn.Module) -> None:
    """Copies the sharded student's full weights into `replica` (a plain copy of the same architecture).
    Collective: every rank calls it, in the same order (one all-gather per parameter)."""
    from torch.distributed.tensor import DTensor

    target = dict(replica.named_parameters())
    for name, p in student.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        target[name].copy_(full)
