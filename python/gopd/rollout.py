"""Rollout engines: the student samples responses and reports the sampler's log-probs.

``RolloutEngine.generate(model, prompts, ...)`` takes prompt token id lists and returns a
``Rollouts``: response ids (ending at eos when it was sampled) and per-token log-probs
log softmax(logits / T)[y] of the sampler. The ``hf`` engine is a plain KV-cache decoding loop on a
transformers model (so sampling is seeded by our own torch.Generator and exactly reproducible);
``vllm`` is optional and not built here yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class Rollouts:
    responses: List[List[int]]        # sampled ids per prompt (eos included when sampled)
    logprobs: List[List[float]]       # the sampler's log-prob of each sampled id


class RolloutEngine:
    name = "base"

    def generate(self, model, prompts: List[List[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
                 temperature: float = 1.0, greedy: bool = False,
                 generator: Optional[torch.Generator] = None) -> Rollouts:
        raise NotImplementedError

    def sync_weights(self, model) -> None:
        """Engines with their own copy of the weights refresh it here (the hf engine shares them)."""


class HFRollout(RolloutEngine):
    """Batched sampling with a KV cache on any transformers causal LM (left-padded prompts)."""

    name = "hf"

    @torch.no_grad()
    def generate(self, model, prompts, *, max_new_tokens, eos_id, pad_id, temperature=1.0, greedy=False,
                 generator=None):
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        b, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((b, width), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        # Positions count real tokens only, so left padding does not shift them.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
        done = torch.zeros(b, dtype=torch.bool, device=device)
        responses = [[] for _ in range(b)]
        logprobs = [[] for _ in range(b)]
        next_pos = positions[:, -1] + 1
        for _ in range(max_new_tokens):
            logp = torch.log_softmax(logits / temperature, dim=-1)
            if greedy:
                tok = logp.argmax(-1)
            else:
                tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            lp = logp.gather(-1, tok[:, None]).squeeze(-1)
            for i in range(b):
                if not done[i]:
                    responses[i].append(int(tok[i]))
                    logprobs[i].append(float(lp[i]))
            done |= tok == eos_id
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
            out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                        past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1].float()
            next_pos = next_pos + 1
        model.train(was_training)
        return Rollouts(responses, logprobs)


def make_engine(name: str) -> RolloutEngine:
    if name == "hf":
        return HFRollout()
    if name == "vllm":
        raise NotImplementedError("the vllm rollout engine is not implemented yet; use rollout_engine: hf")
    raise ValueError(f"unknown rollout engine {name!r}")
