"""pass@1 of greedy decoding with a numeric / boxed answer verifier."""

from __future__ import annotations

import re
from typing import List, Optional

from .data import DataError, Example
from .progress import progress_bar

_NUM = re.compile(r"-?\d+(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_answer(text: str) -> Optional[str]:
    """The \\boxed{...} content if present, else the last number in the text."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    nums = _NUM.findall(text.replace(",", ""))
    return nums[-1] if nums else None


def is_correct(text: str, answer: str) -> bool:
    got = extract_answer(text)
    if got is None:
        return False
    try:
        return abs(float(got) - float(answer)) < 1e-6
    except ValueError:
        return got.strip() == answer.strip()


def evaluate(model, codec, engine, examples: List[Example], *, max_new_tokens: int, batch_size: int = 16,
             progress: bool = False, desc: str = "eval", prompt_fn=None) -> float:
    """Fraction of examples whose greedy response the verifier accepts; prompt_fn(example) -> ids
    (default codec.prompt_ids) lets a teacher be evaluated with its privileged prompt."""
    prompt_fn = prompt_fn or codec.prompt_ids
    if any(ex.answer is None for ex in examples):
        raise DataError("the eval set has examples without an 'answer'; the verifier needs one per example")
    correct = 0
    for start in progress_bar(range(0, len(examples), batch_size), progress=progress, desc=desc):
        batch = examples[start:start + batch_size]
        out = engine.generate(model, [prompt_fn(ex) for ex in batch], max_new_tokens=max_new_tokens,
                              eos_id=codec.eos_id, pad_id=codec.pad_id, greedy=True)
        correct += sum(is_correct(codec.decode(r), ex.answer) for r, ex in zip(out.responses, batch))
    return correct / max(1, len(examples))
