"""Prompts with verifiable answers: JSONL files and a built-in synthetic arithmetic generator.

A JSONL line is an object with ``prompt`` (a string) or ``messages`` (a chat list of {role, content}),
an optional ``answer`` (what the verifier compares against) and an optional ``domain`` (routes the
example to that domain's teacher; default "default") and an optional ``solution`` (a worked answer, what
an SFT expert is trained to say; gopd.sft).
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from typing import List, Optional, Tuple


@dataclass
class Example:
    prompt: Optional[str] = None
    messages: Optional[list] = None
    answer: Optional[str] = None
    domain: str = "default"
    solution: Optional[str] = None    # a worked answer ("7 + 5 = 12"): what an SFT expert is trained to say

    def user_text(self) -> str:
        if self.prompt is not None:
            return self.prompt
        return "\n".join(m["content"] for m in self.messages if m.get("role") == "user")


class DataError(ValueError):
    """A dataset that cannot be used (malformed line, empty file, missing answers)."""


def load_jsonl(path: str) -> List[Example]:
    examples = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            prompt, messages = obj.get("prompt"), obj.get("messages")
            if (prompt is None) == (messages is None):
                raise DataError(f"{where}: give exactly one of 'prompt' (string) or 'messages' (chat list)")
            if prompt is not None and not isinstance(prompt, str):
                raise DataError(f"{where}: 'prompt' must be a string")
            if messages is not None and not (isinstance(messages, list) and all(
                    isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
                raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
            answer, solution = obj.get("answer"), obj.get("solution")
            if solution is not None and not isinstance(solution, str):
                raise DataError(f"{where}: 'solution' must be a string")
            examples.append(Example(prompt=prompt, messages=messages,
                                    answer=None if answer is None else str(answer),
                                    domain=str(obj.get("domain", "default")), solution=solution))
    if not examples:
        raise DataError(f"{path}: the dataset is empty")
    return examples


_OPS = {"add": ("+", lambda a, b: a + b), "sub": ("-", lambda a, b: a - b), "mul": ("*", lambda a, b: a * b)}


def synthetic_arithmetic(n: int, digits: int = 2, ops=("add",), seed: int = 0,
                         exclude: Optional[set] = None, distinct: bool = False) -> List[Example]:
    """n questions "What is a <op> b?" with a, b of `digits` digits; the domain is the op's name
    (add / sub / mul), so a mixed set exercises multi-teacher routing. Questions whose prompt is in
    `exclude` are skipped (held-out eval sets exclude the training prompts); with `distinct` no question
    repeats (an eval set then measures n different questions)."""
    for op in ops:
        if op not in _OPS:
            raise DataError(f"unknown synthetic op {op!r}; choose from {sorted(_OPS)}")
    if not isinstance(digits, int) or isinstance(digits, bool) or digits < 1:
        raise DataError(f"synthetic_digits must be an int >= 1, got {digits!r}")
    exclude = set(exclude or ())
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    possible = (hi - lo + 1) ** 2
    out = []
    for i in range(n):
        op = ops[i % len(ops)]
        sym, fn = _OPS[op]
        # A bounded number of redraws: a small question space could be used up by `exclude`.
        for _ in range(50 * possible):
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            prompt = f"What is {a} {sym} {b}? Answer with just the number."
            if prompt not in exclude:
                break
        else:
            raise DataError(f"no {digits}-digit '{op}' question is left outside the excluded (training) set")
        out.append(Example(prompt=prompt, answer=str(fn(a, b)), domain=op, solution=f"{a} {sym} {b} = {fn(a, b)}"))
        if distinct:
            exclude.add(prompt)
    return out


def privileged(example: Example, kind: str) -> Example:
    """The same question with privileged context for the teacher (on-policy context distillation):
    'solution' states the answer, 'examples' prepends worked examples of the same operation."""
    if kind == "none":
        return example
    if kind == "solution":
        if example.answer is None:
            raise DataError("teacher_context='solution' needs examples with an 'answer'")
        # Right after the question, where a 135M model uses it: measured on 64 2-digit additions,
        # SmolLM2-135M-Instruct scores 0.55 with this suffix, 0.23 with a "Hint: ..." line before the
        # question and 0.17 without (the student).
        suffix = f" (It is {example.answer}.)"
        return _with_user_text(example, lambda text: text + suffix)
    shots = synthetic_arithmetic(3, digits=2, ops=(example.domain,) if example.domain in _OPS else ("add",),
                                 seed=zlib.crc32(example.user_text().encode()))
    extra = "Worked examples:\n" + "\n".join(f"{s.prompt} {s.answer}" for s in shots)
    return _with_user_text(example, lambda text: f"{extra}\n{text}")


def _with_user_text(example: Example, edit) -> Example:
    """A copy of the example whose (last) user message is edit(text)."""
    if example.prompt is not None:
        return Example(prompt=edit(example.prompt), answer=example.answer, domain=example.domain,
                       solution=example.solution)
    messages = [dict(m) for m in example.messages]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] = edit(messages[last_user]["content"])
    return Example(messages=messages, answer=example.answer, domain=example.domain, solution=example.solution)


def load(spec: str, *, n: int, digits: int, ops, seed: int, exclude: Optional[set] = None,
         distinct: bool = False) -> List[Example]:
    """`exclude` / `distinct`: see synthetic_arithmetic (a JSONL file is taken as it is)."""
    if spec == "synthetic":
        return synthetic_arithmetic(n, digits=digits, ops=tuple(ops), seed=seed, exclude=exclude,
                                    distinct=distinct)
    return load_jsonl(spec)


def run_sets(cfg) -> Tuple[List[Example], List[Example]]:
    """(training set, eval set) of a run (cfg: a gopd.config.Config), from data_seed (default: seed).
    Synthetic eval questions are held out (none is a training question) and distinct. Refuses an empty
    training set and eval examples without an answer (the verifier needs one)."""
    seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    train = load(cfg.train_data, n=cfg.n_train, digits=cfg.synthetic_digits, ops=cfg.synthetic_ops, seed=seed)
    held_out = load(cfg.eval_data, n=cfg.n_eval, digits=cfg.synthetic_digits, ops=cfg.synthetic_ops,
                    seed=seed + 1, exclude={ex.user_text() for ex in train}, distinct=True)
    if not train:
        raise DataError("the training set is empty")
    if any(ex.answer is None for ex in held_out):
        raise DataError("the eval set has examples without an 'answer'; the verifier needs them")
    return train, held_out
