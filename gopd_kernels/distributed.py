"""Data parallel (DDP, FSDP2): the token count that makes reduction="mean" the global token-mean.

With reduction="mean" each rank divides its own tokens' loss sum by a denominator; DDP and FSDP2 then
*average* the gradients over the W ranks. The gradient of the global token-mean
sum_{all ranks' tokens} loss_i / N_global is therefore obtained when every rank divides by
N_global / W, where N_global is the number of valid tokens (target != ignore_index) over all ranks
and all gradient-accumulation micro-batches of the step. A per-rank mean instead weights a rank's
tokens by 1 / N_rank, which is wrong whenever ranks hold different numbers of tokens.
The loss value each rank reports is then sum_rank / (N_global / W); the average of these over the
ranks is the global token-mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def global_num_items(targets, *, ignore_index=-100, group=None, grads_averaged=True) -> torch.Tensor:
    """The ``num_items_in_batch`` for the global token-mean under DDP / FSDP2 (see the module doc).

    targets: one [...] tensor of token ids, or a list of them (the micro-batches of one optimizer step
    under gradient accumulation). Counts the valid tokens, sums the count over ``group`` (all-reduce;
    every rank must call this) and divides by the group's size when ``grads_averaged`` (DDP and
    FSDP2 average gradients; pass False for a gradient sum). Returns a 0-d float64 tensor on the
    targets' device; without an initialised process group it is the local count.
    """
    parts = [targets] if isinstance(targets, torch.Tensor) else list(targets)
    if not parts or not all(isinstance(t, torch.Tensor) for t in parts):
        raise TypeError("targets: expected a tensor of token ids or a non-empty list of them")
    count = sum((t != ignore_index).sum() for t in parts).to(torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, group=group)
        if grads_averaged:
            count = count / dist.get_world_size(group)
    return count
