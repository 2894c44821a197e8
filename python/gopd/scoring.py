"""Scoring sequences on final hidden states + LM-head weights (no [N, V] logits for any model).

For a prompt of length P and a response y_1..y_R, the hidden state at position P-1+j predicts y_{j+1};
``response_hidden`` returns those R rows for every example, concatenated in batch order ([N, D],
N = total response tokens). The base model's last_hidden_state is taken: in Llama-style models it
is already passed through the final norm, so logits = h @ W_head^T (+ bias) exactly as the LM head
would compute them.
"""

from __future__ import annotations

from typing import List

import torch


def base_model(model):
    return getattr(model, model.base_model_prefix)


def padded_batch(seqs: List[List[int]], pad_id: int, device):
    """(ids, attention mask), both [B, max length] int64: the sequences right-padded with pad_id."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def response_hidden(model, prompts: List[List[int]], responses: List[List[int]], pad_id: int) -> torch.Tensor:
    """[N, D] final hidden states predicting each response token (right padding, positions 0..L-1)."""
    device = next(model.parameters()).device
    ids, mask = padded_batch([p + r for p, r in zip(prompts, responses)], pad_id, device)
    hidden = base_model(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    rows = [hidden[i, len(p) - 1: len(p) - 1 + len(r)] for i, (p, r) in enumerate(zip(prompts, responses))]
    return torch.cat(rows, dim=0)


def targets_of(responses: List[List[int]], device) -> torch.Tensor:
    return torch.tensor([t for r in responses for t in r], dtype=torch.long, device=device)


def padded(flat: torch.Tensor, lengths: List[int], fill=0) -> torch.Tensor:
    """[B, T, ...] from [N, ...]: the rows of B sequences of the given lengths (concatenated in batch order,
    the layout above; sum(lengths) = N) one sequence per row, right-padded with `fill` to T = max(lengths).
    Differentiable (the loss's sequence reductions read sequences as rows of [B, T])."""
    return torch.nn.utils.rnn.pad_sequence(list(flat.split(lengths)), batch_first=True, padding_value=fill)


def unpadded(rows: torch.Tensor, lengths: List[int]) -> torch.Tensor:
    """The inverse of ``padded``: [N, ...] from [B, T, ...]."""
    keep = torch.arange(rows.shape[1], device=rows.device) < torch.tensor(lengths, device=rows.device)[:, None]
    return rows[keep]
