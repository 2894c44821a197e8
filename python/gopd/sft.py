"""Domain experts made by supervised fine-tuning (SFT) of a base model, cached on disk.

A teacher spec ``{"sft": BASE, "ops": [...], "steps": k, "lr": a, "batch_size": b, "seed": s}`` is a copy of
the model BASE (usually the student's own spec) trained for k AdamW steps on the run's training questions
of the domains in ``ops`` (all domains when absent), each answered by its worked solution
(``Example.solution``, else its answer) and eos. Loss per step, over a batch of b questions:

    L = - (1 / #response tokens) sum over response tokens of log p(token | prompt, earlier response tokens)

(prompt tokens carry no loss). The expert sees only training questions, so held-out evaluation stays
held out. The trained weights are saved under ``cache_dir/<key>.pt``, the key a hash of the base spec,
the hyper-parameters and the exact (prompt, target) token ids, so both demo arms and every seed of an
experiment reuse one expert, and any change of data or settings builds a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from typing import List, Sequence

import torch

from . import checkpoint
from .config import ConfigError, as_number
from .data import Example
from .progress import note, phase
from .scoring import padded_batch

SFT_KEYS = frozenset({"sft", "ops", "steps", "lr", "batch_size", "seed"})
DEFAULTS = dict(steps=40, lr=5e-5, batch_size=8, seed=0)


class SFTSpecError(ValueError):
    """An SFT teacher spec that cannot be built."""


def is_sft(spec) -> bool:
    return isinstance(spec, dict) and "sft" in spec


def check_spec(spec: dict, name: str) -> dict:
    """The spec with defaults filled in; a clear error naming `name` and the bad key otherwise."""
    unknown = sorted(set(spec) - SFT_KEYS)
    if unknown:
        raise SFTSpecError(f"{name}: unknown key(s) {unknown} in an sft spec; valid keys: {sorted(SFT_KEYS)}")
    out = dict(DEFAULTS, **spec)
    try:
        out["lr"] = as_number(out["lr"], f"{name}: sft 'lr'")
    except ConfigError as exc:
        raise SFTSpecError(str(exc)) from None
    for key in ("steps", "batch_size"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
            raise SFTSpecError(f"{name}: sft '{key}' must be an int >= 1, got {out[key]!r}")
    if not isinstance(out["lr"], (int, float)) or not out["lr"] > 0:
        raise SFTSpecError(f"{name}: sft 'lr' must be a number > 0, got {out['lr']!r}")
    if "ops" in out and (not isinstance(out["ops"], list) or not out["ops"]):
        raise SFTSpecError(f"{name}: sft 'ops' must be a non-empty list of domains, got {out['ops']!r}")
    return out


def target_ids(codec, ex: Example) -> List[int]:
    """The SFT target of one question: its worked solution (else its answer), then eos."""
    text = ex.solution if ex.solution is not None else ex.answer
    if text is None:
        raise SFTSpecError(f"an sft teacher needs training examples with a 'solution' or an 'answer': {ex.user_text()!r}")
    return codec.text_ids(text) + [codec.eos_id]


def cache_key(spec: dict, pairs: Sequence) -> str:
    h = hashlib.sha256(json.dumps({k: spec[k] for k in sorted(spec)}, sort_keys=True, default=repr).encode())
    for prompt, target in pairs:
        h.update(json.dumps([prompt, target]).encode())
    return h.hexdigest()[:16]


def sft_loss(model, codec, batch) -> torch.Tensor:
    """Mean cross-entropy over the response tokens of `batch` [(prompt ids, target ids)], right-padded."""
    device = next(model.parameters()).device
    ids, mask = padded_batch([p + t for p, t in batch], codec.pad_id, device)
    labels = torch.full_like(ids, -100)
    for i, (p, t) in enumerate(batch):
        labels[i, len(p):len(p) + len(t)] = torch.tensor(t)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


def train(model, codec, pairs: Sequence, *, steps: int, lr: float, batch_size: int, seed: int,
          name: str = "expert", progress: bool = True) -> List[float]:
    """`steps` AdamW steps of SFT on `pairs` (shuffled epochs, seeded); returns the loss per step.
    Progress is reported as the phase "SFT <name>" (gopd.progress; progress=False: no bar)."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    order: List[int] = []
    losses = []
    with phase(f"SFT {name}", total=steps, bar=progress) as done:
        for _ in range(steps):
            if len(order) < batch_size:
                extra = list(range(len(pairs)))
                rng.shuffle(extra)
                order += extra
            batch = [pairs[i] for i in order[:batch_size]]
            order = order[batch_size:]
            loss = sft_loss(model, codec, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            done.advance(loss=f"{losses[-1]:.4g}")
    model.eval()
    return losses


def expert(spec: dict, name: str, base: torch.nn.Module, codec, examples: Sequence[Example], cache_dir: str,
           progress: bool = True):
    """The SFT expert of `spec`, fine-tuned from a copy of `base` on `examples` (the run's training
    questions) of the spec's domains; loaded from `cache_dir` when the same expert was built before."""
    import copy

    spec = check_spec(spec, name)
    chosen = [ex for ex in examples if "ops" not in spec or ex.domain in spec["ops"]]
    if not chosen:
        raise SFTSpecError(f"{name}: no training question of domain(s) {spec.get('ops')} to fine-tune on")
    pairs = [(codec.prompt_ids(ex), target_ids(codec, ex)) for ex in chosen]
    key = cache_key(spec, pairs)
    path = os.path.join(cache_dir, f"sft-{key}.pt")
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        note(f"{name}: SFT expert loaded from {path}")
    else:
        t = time.perf_counter()
        losses = train(model, codec, pairs, steps=spec["steps"], lr=spec["lr"], batch_size=spec["batch_size"],
                       seed=spec["seed"], name=name, progress=progress)
        os.makedirs(cache_dir, exist_ok=True)
        checkpoint.atomic_save(model.state_dict(), path)
        note(f"{name}: SFT expert built in {time.perf_counter() - t:.0f} s on {len(pairs)} questions "
             f"(loss {losses[0]:.3f} -> {losses[-1]:.3f}), cached at {path}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
