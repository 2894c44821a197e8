"""A weaker student with the teacher's tokenizer: a model with a block of its decoder layers removed,
then briefly re-trained ("healed") to imitate the full model, saved as a transformers checkpoint.

Healing is sequence-level distillation from the full model: its greedy responses to the heal prompts
(the run's training questions) are the SFT targets (gopd.sft.train: token cross-entropy on the response,
then eos). So the student starts as a worse copy of the full model, right and wrong answers alike, not as
a model taught the task. The checkpoint lands in ``cache_dir/truncated-<key>``, the key a hash of the
base spec, the removed layers, the heal settings and the exact heal token ids, so every seed and arm
reuses one student and any change builds a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Sequence

import torch

from .. import sft
from ..config import ConfigError
from ..models import Codec, load_model
from ..progress import note
from ..rollout import make_engine

TRUNCATE_KEYS = frozenset({"drop", "heal_steps", "heal_lr", "heal_batch_size", "seed"})


def check_spec(spec: dict, n_layers: int) -> dict:
    """{"drop": [first, stop], "heal_steps": k, "heal_lr": a, "heal_batch_size": b, "seed": s}: layers
    first .. stop - 1 (0-based) are removed; a clear error naming the bad key otherwise."""
    if not isinstance(spec, dict):
        raise ConfigError(f"experiment.truncate must be a mapping, got {spec!r}")
    unknown = sorted(set(spec) - TRUNCATE_KEYS)
    if unknown:
        raise ConfigError(f"experiment.truncate: unknown key(s) {unknown}; valid: {sorted(TRUNCATE_KEYS)}")
    out = dict(dict(heal_steps=40, heal_lr=1e-4, heal_batch_size=8, seed=0), **spec)
    drop = out.get("drop")
    if (not isinstance(drop, list) or len(drop) != 2 or not all(isinstance(x, int) for x in drop)
            or not 0 <= drop[0] < drop[1] <= n_layers or drop[1] - drop[0] >= n_layers):
        raise ConfigError(f"experiment.truncate.drop must be [first, stop] with 0 <= first < stop <= {n_layers} "
                         f"leaving at least one layer, got {drop!r}")
    for key in ("heal_steps", "heal_batch_size"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < (0 if key == "heal_steps" else 1):
            raise ConfigError(f"experiment.truncate.{key} must be an int >= {0 if key == 'heal_steps' else 1}, "
                             f"got {out[key]!r}")
    if not isinstance(out["heal_lr"], (int, float)) or not out["heal_lr"] > 0:
        raise ConfigError(f"experiment.truncate.heal_lr must be a number > 0, got {out['heal_lr']!r}")
    return out


def drop_layers(model: torch.nn.Module, first: int, stop: int) -> torch.nn.Module:
    """Removes decoder layers first .. stop - 1 of a transformers decoder-only model in place (and renumbers
    the remaining layers' KV-cache slots); returns it."""
    layers = model.model.layers
    keep = [layer for i, layer in enumerate(layers) if not first <= i < stop]
    model.model.layers = torch.nn.ModuleList(keep)
    for i, layer in enumerate(keep):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = i
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = i
    cfg = model.config
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if not first <= i < stop]
    cfg.num_hidden_layers = len(keep)
    return model


def heal_pairs(base, codec: Codec, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 32):
    """(prompt ids, the base's greedy response + eos) per prompt: the heal SFT targets."""
    engine = make_engine("hf", seed=0)
    pairs = []
    for start in range(0, len(prompts), batch_size):
        batch = [list(p) for p in prompts[start:start + batch_size]]
        out = engine.generate(base, batch, max_new_tokens=max_new_tokens, eos_id=codec.eos_id,
                              pad_id=codec.pad_id, greedy=True)
        for p, r in zip(batch, out.responses):
            r = [t for t in r if t != codec.eos_id]
            pairs.append((p, r + [codec.eos_id]))
    return pairs


def load(path: str, base_spec, device: str = "cpu"):
    """(the truncated student saved at `path`, the tokenizer of `base_spec`): the student shares the base's
    tokenizer, which is taken from the base itself (a tiny test model's has no files to save)."""
    from transformers import AutoModelForCausalLM

    _, tok = load_model(base_spec, device)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device), tok


def build(base_spec, spec: dict, examples, cache_dir: str, max_new_tokens: int, device: str = "cpu") -> str:
    """The path of the truncated, healed student of `spec` (see check_spec) made from `base_spec` and
    healed on `examples`' prompts; built once and cached (module docstring)."""
    base, tok = load_model(base_spec, device)
    spec = check_spec(spec, base.config.num_hidden_layers)
    codec = Codec(tok)
    prompts = [codec.prompt_ids(ex) for ex in examples]
    h = hashlib.sha256(json.dumps(dict(base=repr(base_spec), **spec), sort_keys=True).encode())
    for p in prompts:
        h.update(json.dumps(p).encode())
    h.update(str(max_new_tokens).encode())
    path = os.path.join(cache_dir, f"truncated-{h.hexdigest()[:16]}")
    if os.path.exists(os.path.join(path, "config.json")):
        note(f"truncated student loaded from {path}")
        return path
    t = time.perf_counter()
    base.eval()
    pairs = heal_pairs(base, codec, prompts, max_new_tokens) if spec["heal_steps"] else []
    student = drop_layers(base, *spec["drop"])
    losses = [float("nan")]
    if spec["heal_steps"]:
        losses = sft.train(student, codec, pairs, steps=spec["heal_steps"], lr=spec["heal_lr"],
                           batch_size=spec["heal_batch_size"], seed=spec["seed"])
    tmp = path + ".tmp"
    student.save_pretrained(tmp)
    if hasattr(tok, "save_pretrained"):
        tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "heal.json"), "w") as fh:
        json.dump(dict(spec=spec, base=repr(base_spec), heal_losses=losses), fh)
    os.replace(tmp, path)
    note(f"truncated student (layers {spec['drop'][0]}..{spec['drop'][1] - 1} removed, "
         f"{student.config.num_hidden_layers} left) healed in {time.perf_counter() - t:.0f} s "
         f"(loss {losses[0]:.3f} -> {losses[-1]:.3f}), saved at {path}")
    return path
