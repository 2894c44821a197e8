"""How far the student is from a teacher: reverse KL on the student's own samples, by plain scoring.

    KL(pi_s || pi_t) = E_{x ~ prompts} E_{y ~ pi_s(.|x)} [ (1/|y|) sum_j KL(p_s(.|x, y_<j) || p_t(.|x', y_<j)) ]

token-averaged over the responses of the batch (the weighting of the trainer's token-mean loss), where
p_m = softmax(logits_m / T) over the whole vocabulary and x' is the teacher's prompt (it may hold privileged
context). At lam = 1 in full mode this is the quantity OPD minimises, so it is the natural progress measure
of a distillation run; with a teacher that the student can match, it should fall towards 0.

This module is deliberately independent of the training path: it scores with each model's own forward
(`model(...).logits`, LM-head bias included), not with gopd_kernels or gopd.scoring, so a bug in the loss,
its gradient or the alignment of hidden states and targets shows up here as a KL that does not fall.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .data import Example
from .scoring import padded_batch


@torch.no_grad()
def token_logprobs(model, prompts: List[List[int]], responses: List[List[int]], pad_id: int,
                   temperature: float = 1.0, vocab: Optional[int] = None) -> List[torch.Tensor]:
    """Per example, [len(response), V] float64 log-softmax(logits / T) of the rows that predict each
    response token. A vocabulary wider than `vocab` (a padded teacher head) is cut to it and renormalised."""
    device = next(model.parameters()).device
    ids, mask = padded_batch([p + r for p, r in zip(prompts, responses)], pad_id, device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        # Position t predicts token t + 1: the response's tokens are predicted by positions P-1 .. P+R-2.
        rows = logits[i, len(p) - 1: len(p) - 1 + len(r)].double()
        if vocab is not None:
            rows = rows[:, :vocab]
        out.append(torch.log_softmax(rows / temperature, dim=-1))
    return out


def reverse_kl(logp_s: torch.Tensor, logp_t: torch.Tensor) -> torch.Tensor:
    """Per row: sum_v p_s(v) (log p_s(v) - log p_t(v)); terms with p_s(v) = 0 count 0."""
    p_s = logp_s.exp()
    diff = torch.where(p_s > 0, logp_s - logp_t, torch.zeros_like(logp_s))
    return (p_s * diff).sum(-1)


@torch.no_grad()
def kl_to_teacher(student, teacher, codec, engine, examples: List[Example], *, max_new_tokens: int,
                  teacher_prompt_fn: Optional[Callable] = None, temperature: float = 1.0, seed: int = 0,
                  batch_size: int = 16) -> float:
    """Token-mean reverse KL(student || teacher) on one sampled student response per example.

    The responses are sampled at `temperature` with a generator seeded by `seed`, so repeated calls on an
    unchanged student score the same responses. teacher_prompt_fn(example) -> ids gives the teacher's prompt
    (default: the student's). Returns nan when the student wrote no tokens at all."""
    if not examples:
        raise ValueError("kl_to_teacher: `examples` is empty")
    teacher_prompt_fn = teacher_prompt_fn or codec.prompt_ids
    device = next(student.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    vocab = student.get_output_embeddings().weight.shape[0]
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        prompts = [codec.prompt_ids(ex) for ex in batch]
        roll = engine.generate(student, prompts, max_new_tokens=max_new_tokens, eos_id=codec.eos_id,
                               pad_id=codec.pad_id, temperature=temperature, generator=gen)
        keep = [i for i, r in enumerate(roll.responses) if r]
        if not keep:
            continue
        resp = [roll.responses[i] for i in keep]
        was_training = student.training
        student.eval()
        lp_s = token_logprobs(student, [prompts[i] for i in keep], resp, codec.pad_id, temperature)
        student.train(was_training)
        lp_t = token_logprobs(teacher, [teacher_prompt_fn(batch[i]) for i in keep], resp, codec.pad_id,
                              temperature, vocab=vocab)
        for a, b in zip(lp_s, lp_t):
            total += float(reverse_kl(a, b).sum())
            count += a.shape[0]
    return total / count if count else float("nan")
