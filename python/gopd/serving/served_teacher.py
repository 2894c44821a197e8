"""A teacher behind an HTTP server (``gopd serve`` or vLLM's OpenAI-compatible server), for the trainer.

Config: ``teacher: {url: http://host:port, top_k: k}`` (also as a value of ``teachers``), optional keys
``model`` (the served name; default: the first of GET /v1/models), ``timeout`` (seconds per request),
``retries`` (attempts after the first), ``backoff`` (seconds before the first retry, doubled each time) and
``max_concurrency`` (requests in flight).

Each scored sequence is one request: the teacher's prompt + the response as token ids, ``max_tokens: 1``,
``prompt_logprobs: top_k``. For a prompt of length P and a response y_1..y_R, entries P..P+R-1 of
``prompt_logprobs`` hold log p_t(y_j | ...) (the actual token, always present) and the teacher's top-k there.
Log-probs are at temperature 1 (what vLLM reports for prompt log-probs).

Every answer is checked against its request: one entry per prompt token, the actual token present, ids in
[0, vocab), finite log-probs <= 0, at least k entries. A server that is down, times out, answers 5xx or an
answer that does not match is retried with exponential backoff; after the retries a
:class:`ServedTeacherError` names the server and the last problem. A 4xx (the request itself is wrong) is not
retried. Nothing is ever guessed or padded: the loss never sees a wrong teacher log-prob.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional

import torch

SPEC_KEYS = {"url", "top_k", "model", "timeout", "retries", "backoff", "max_concurrency"}


class ServedTeacherError(RuntimeError):
    """The served teacher could not give a valid answer (after the retries)."""


class _Retryable(Exception):
    pass


def is_served(spec) -> bool:
    """A teacher spec naming a server (a mapping with 'url') rather than a model to load."""
    return isinstance(spec, dict) and "url" in spec


def check_spec(name: str, spec: dict) -> None:
    """Raises ValueError naming the key on a malformed served-teacher spec."""
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"{name}: unknown served-teacher key(s) {unknown}; valid: {sorted(SPEC_KEYS)}")
    url = spec["url"]
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"{name}.url: expected http://host:port, got {url!r}")
    for key, lo in (("top_k", 0), ("retries", 0), ("max_concurrency", 1)):
        v = spec.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise ValueError(f"{name}.{key}: expected an int >= {lo}, got {v!r}")
    for key in ("timeout", "backoff"):
        v = spec.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
            raise ValueError(f"{name}.{key}: expected a number >= 0, got {v!r}")


@dataclass
class TeacherScores:
    """The teacher's answer for one response of R tokens."""

    actual: torch.Tensor         # [R] float32, log p_t(y_j)
    topk_ids: torch.Tensor       # [R, k] int64, descending log-prob
    topk_logprobs: torch.Tensor  # [R, k] float32


class ServedTeacher:
    """Scores responses with a served teacher; see the module docstring."""

    def __init__(self, url: str, *, vocab: int, top_k: int = 1, model: Optional[str] = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, max_concurrency: int = 4):
        self.url = url.rstrip("/")
        self.vocab, self.top_k, self.model = vocab, top_k, model
        self.timeout, self.retries, self.backoff, self.max_concurrency = timeout, retries, backoff, max_concurrency
        if top_k > vocab:
            raise ValueError(f"top_k: {top_k} is more than the vocabulary ({vocab})")
        self.bytes_received = 0      # response bodies, for the benchmark
        self.bytes_sent = 0          # request bodies

    @classmethod
    def from_spec(cls, spec: dict, vocab: int) -> "ServedTeacher":
        return cls(spec["url"], vocab=vocab, **{k: v for k, v in spec.items() if k != "url" and v is not None})

    def __repr__(self):
        return f"ServedTeacher({self.url!r}, top_k={self.top_k})"

    # ---------------------------------------------------------------- HTTP with retries
    def _http(self, method: str, path: str, body: Optional[dict] = None):
        data = None if body is None else json.dumps(body).encode()
        self.bytes_sent += len(data or b"")
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode(errors="replace")
            if 400 <= e.code < 500 and e.code not in (408, 429):
                raise ServedTeacherError(f"served teacher {self.url}{path} refused the request "
                                         f"(HTTP {e.code}): {detail}") from None
            raise _Retryable(f"HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
            raise _Retryable(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
        self.bytes_received += len(raw)
        try:
            return json.loads(raw)
        except ValueError:
            raise _Retryable(f"the answer is not JSON: {raw[:200]!r}") from None

    def _with_retries(self, what: str, fn):
        delay, last, attempts = self.backoff, None, 0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(delay)
                delay *= 2
            attempts += 1
            try:
                return fn()
            except _Retryable as e:
                last = e
        raise ServedTeacherError(f"served teacher {self.url}: {what} failed after {attempts} attempts; "
                                 f"last problem: {last}")

    def model_name(self) -> str:
        if self.model is None:
            def ask():
                answer = self._http("GET", "/v1/models")
                try:
                    return answer["data"][0]["id"]
                except (KeyError, IndexError, TypeError):
                    raise _Retryable(f"GET /v1/models answered {str(answer)[:200]}") from None
            self.model = self._with_retries("GET /v1/models", ask)
        return self.model

    # ---------------------------------------------------------------- scoring
    def _score_one(self, prompt: List[int], response: List[int]) -> TeacherScores:
        seq = list(prompt) + list(response)
        body = dict(model=self.model_name(), prompt=seq, max_tokens=1, prompt_logprobs=self.top_k, temperature=0)

        def ask():
            return parse_answer(self._http("POST", "/v1/completions", body), seq, len(prompt), self.top_k,
                                self.vocab)

        return self._with_retries(f"scoring a sequence of {len(seq)} tokens", ask)

    def score(self, prompts: List[List[int]], responses: List[List[int]]) -> List[TeacherScores]:
        """One TeacherScores per (teacher prompt, response), at most max_concurrency requests in flight."""
        self.model_name()
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(self._score_one, prompts, responses))


def parse_answer(answer, seq: List[int], n_prompt: int, k: int, vocab: int) -> TeacherScores:
    """Checks a /v1/completions answer against its request and extracts the response positions.

    Raises _Retryable (with what is wrong) on any mismatch."""
    try:
        entries = answer["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise _Retryable(f"no choices[0].prompt_logprobs in the answer: {str(answer)[:200]}") from None
    if not isinstance(entries, list) or len(entries) != len(seq):
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise _Retryable(f"prompt_logprobs has {got} entries for a prompt of {len(seq)} tokens")
    n = len(seq) - n_prompt
    actual = torch.empty(n, dtype=torch.float32)
    ids = torch.empty(n, k, dtype=torch.long)
    lps = torch.empty(n, k, dtype=torch.float32)
    for j in range(n):
        pos = n_prompt + j
        entry = entries[pos]
        if not isinstance(entry, dict):
            raise _Retryable(f"prompt_logprobs[{pos}] is {str(entry)[:80]}, not a mapping")
        items = []
        for key, val in entry.items():
            try:
                tid, lp = int(key), float(val["logprob"] if isinstance(val, dict) else val)
            except (TypeError, ValueError, KeyError):
                raise _Retryable(f"prompt_logprobs[{pos}] has a malformed item {key!r}: {str(val)[:80]}") from None
            if not 0 <= tid < vocab:
                raise _Retryable(f"prompt_logprobs[{pos}] names token id {tid}, outside the vocabulary [0, {vocab})")
            if not (math.isfinite(lp) or lp == -math.inf) or lp > 1e-6:
                raise _Retryable(f"prompt_logprobs[{pos}][{tid}] = {lp} is not a log-probability")
            items.append((min(lp, 0.0), tid))
        tok = seq[pos]
        own = [lp for lp, tid in items if tid == tok]
        if not own:
            raise _Retryable(f"prompt_logprobs[{pos}] lacks the actual token {tok}")
        if len(items) < k:
            raise _Retryable(f"prompt_logprobs[{pos}] has {len(items)} entries, fewer than top_k {k}")
        items.sort(key=lambda x: (-x[0], x[1]))
        actual[j] = own[0]
        for r in range(k):
            lps[j, r], ids[j, r] = items[r][0], items[r][1]
    return TeacherScores(actual, ids, lps)
