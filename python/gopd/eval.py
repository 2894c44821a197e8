"""pass@1 of greedy decoding with an answer verifier.

Two verifiers (config `verifier`):
  lenient  the \\boxed{...} content if present, else the last number anywhere in the response;
  strict   the whole response (surrounding whitespace and one final period aside) is the answer and
           nothing else: a bare number, a lone \\boxed{number}, or one true equation whose left side is
           only numbers and + - * / (the question restated) and whose right side is the number
           ("7 + 1 = 8"). "8 apples", "The answer is 8.", "7 + 1 = 8, so 8", "7 + 1 = 8\\n\\nThis is..." and
           "7 + 2 = 8" are wrong: no number is taken from inside other text, and the left side must
           evaluate (usual precedence) to the right side.
"""

from __future__ import annotations

import re
from typing import List, Optional

from .data import DataError, Example
from .progress import phase

_NUM = re.compile(r"-?\d+(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = r"-?\d+(?:\.\d+)?"
_STRICT = re.compile(rf"\s*(?:\\boxed\{{\s*({_NUMBER})\s*\}}|(?:({_NUMBER}(?:\s*[-+*/]\s*{_NUMBER})+)\s*=\s*)?({_NUMBER}))\.?\s*")
VERIFIERS = ("lenient", "strict")


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


def is_correct_strict(text: str, answer: str) -> bool:
    """True when the response is exactly the (numeric) answer: see the module docstring."""
    m = _STRICT.fullmatch(text)
    if m is None:
        return False
    boxed, lhs, got = m.groups()
    try:
        if abs(float(boxed or got) - float(answer)) >= 1e-6:
            return False
    except ValueError:
        return False
    return lhs is None or abs(_arithmetic(lhs) - float(got)) < 1e-6


def _arithmetic(text: str) -> float:
    """Value of numbers joined by + - * / with the usual precedence (the strict pattern admits nothing
    else: a number, then operator and number pairs); nan on division by zero."""
    text = re.sub(r"\s+", "", text)
    first = _NUM.match(text)
    terms, signs, pos = [float(first.group())], [], first.end()
    while pos < len(text):
        op, num = text[pos], _NUM.match(text, pos + 1)
        x, pos = float(num.group()), num.end()
        if op == "*":
            terms[-1] *= x
        elif op == "/":
            terms[-1] = terms[-1] / x if x != 0 else float("nan")
        else:
            signs.append(1.0 if op == "+" else -1.0)
            terms.append(x)
    return terms[0] + sum(s * t for s, t in zip(signs, terms[1:]))


def verify(text: str, answer: str, verifier: str = "lenient") -> bool:
    if verifier == "strict":
        return is_correct_strict(text, answer)
    if verifier == "lenient":
        return is_correct(text, answer)
    raise ValueError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")


def evaluate(model, codec, engine, examples: List[Example], *, max_new_tokens: int, batch_size: int = 16,
             progress: bool = False, desc: str = "eval", prompt_fn=None, verifier: str = "lenient",
             outcomes: Optional[list] = None) -> float:
    """Fraction of examples whose greedy response the verifier accepts; prompt_fn(example) -> ids
    (default codec.prompt_ids) lets a teacher be evaluated with its privileged prompt. `outcomes`, a
    list, receives one bool per example (paired comparisons of two models on the same questions)."""
    if verifier not in VERIFIERS:
        raise ValueError(f"verifier must be one of {VERIFIERS}, got {verifier!r}")
    prompt_fn = prompt_fn or codec.prompt_ids
    if any(ex.answer is None for ex in examples):
        raise DataError("the eval set has examples without an 'answer'; the verifier needs one per example")
    results = []
    starts = range(0, len(examples), batch_size)
    with phase(desc, total=len(starts), bar=progress) as batches:
        for start in starts:
            batch = examples[start:start + batch_size]
            out = engine.generate(model, [prompt_fn(ex) for ex in batch], max_new_tokens=max_new_tokens,
                                  eos_id=codec.eos_id, pad_id=codec.pad_id, greedy=True)
            results += [verify(codec.decode(r), ex.answer, verifier) for r, ex in zip(out.responses, batch)]
            batches.advance()
    if outcomes is not None:
        outcomes[:] = results
    return sum(results) / max(1, len(examples))
