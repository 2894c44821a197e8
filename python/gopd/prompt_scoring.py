"""Prompt log-probs of a causal LM: what a served teacher computes for ``prompt_logprobs: k``.

For a prompt x_0..x_{L-1} and each position j >= 1, with z_{j-1} = the logits the model predicts x_j from
and log p = log_softmax(z_{j-1}) (temperature 1, as vLLM reports prompt log-probs):
    actual_j = log p(x_j),  rank_j = 1 + #{v : log p(v) > log p(x_j)},
    top-k    = the k largest log p(v), ids [k] and log-probs [k] in descending order.
Position 0 has nothing before it (vLLM answers null there).

Logits are computed ``chunk`` positions at a time from the final hidden states and the LM head, so a
batch never holds more than [chunk, V] of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from .models import lm_head
from .scoring import base_model, padded_batch


@dataclass
class PromptLogprobs:
    """Per prompt of length L: tensors over positions 1..L-1 (L - 1 rows)."""

    actual: torch.Tensor      # [L-1] float32, log p(x_j)
    rank: torch.Tensor        # [L-1] int64, 1-based rank of x_j
    topk_ids: torch.Tensor    # [L-1, k] int64
    topk_logprobs: torch.Tensor  # [L-1, k] float32, descending
    next_logits: torch.Tensor    # [V] float32, the logits after the whole prompt (the first generated token)


@torch.no_grad()
def prompt_logprobs(model, prompts: List[List[int]], k: int, pad_id: int = 0, chunk: int = 256
                    ) -> List[PromptLogprobs]:
    """Scores a batch of prompts in one forward pass (right padding); see the module docstring."""
    device = next(model.parameters()).device
    ids, mask = padded_batch(prompts, pad_id, device)
    hidden = base_model(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    weight, bias = lm_head(model)
    out = []
    for i, p in enumerate(prompts):
        n = len(p) - 1
        h = hidden[i, :n].float()
        nxt = ids[i, 1:len(p)]
        actual = torch.empty(n, dtype=torch.float32, device=device)
        rank = torch.empty(n, dtype=torch.long, device=device)
        top_ids = torch.empty(n, k, dtype=torch.long, device=device)
        top_lp = torch.empty(n, k, dtype=torch.float32, device=device)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            z = h[a:b] @ weight.float().t()
            if bias is not None:
                z = z + bias.float()
            logp = torch.log_softmax(z, dim=-1)
            act = logp.gather(1, nxt[a:b, None])
            actual[a:b] = act.squeeze(1)
            rank[a:b] = 1 + (logp > act).sum(-1)
            if k:
                v, j = logp.topk(k, dim=-1)
                top_lp[a:b], top_ids[a:b] = v, j
        last = hidden[i, len(p) - 1].float() @ weight.float().t()
        if bias is not None:
            last = last + bias.float()
        out.append(PromptLogprobs(actual.cpu(), rank.cpu(), top_ids.cpu(), top_lp.cpu(), last.cpu()))
    return out


@torch.no_grad()
def topk_of_hidden(hidden, weight, bias, k: int, vocab: int, temperature: float = 1.0, chunk: int = 256):
    """The top-k of log_softmax((hidden @ weight[:vocab].T + bias) / T) per row: (ids [n, k] int64,
    log-probs [n, k] float32, descending), [chunk, vocab] logits at a time. A co-located teacher's top-k
    in mode topk, so it sees exactly what a served one would."""
    n = hidden.shape[0]
    ids = torch.empty(n, k, dtype=torch.long, device=hidden.device)
    lps = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    w = weight[:vocab].float()
    for a in range(0, n, chunk):
        z = hidden[a:a + chunk].float() @ w.t()
        if bias is not None:
            z = z + bias[:vocab].float()
        v, j = torch.log_softmax(z / temperature, -1).topk(k, dim=-1)
        lps[a:a + chunk], ids[a:a + chunk] = v, j
    return ids, lps


@torch.no_grad()
def next_token_logits(model, prompt: List[int]) -> torch.Tensor:
    """[V] float32 logits of the token after `prompt` (used to generate max_tokens tokens)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    h = base_model(model)(input_ids=ids).last_hidden_state[0, -1].float()
    weight, bias = lm_head(model)
    z = weight.float() @ h
    return z + bias.float() if bias is not None else z
