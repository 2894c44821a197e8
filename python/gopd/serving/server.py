"""``gopd serve``: an HTTP teacher server speaking the part of vLLM's OpenAI-compatible API that scoring needs.

Routes:
    POST /v1/completions  {"model", "prompt": [ids] | [[ids], ...], "max_tokens", "echo", "prompt_logprobs": k,
                           "temperature", "seed"}
        answers in vLLM's format: one choice per prompt, each with ``prompt_logprobs``: a list with one entry
        per prompt token, the first null, each a mapping token-id string -> {logprob, rank, decoded_token}
        holding the top-k ids and the actual token (k or k + 1 entries); plus ``text`` (the prompt's text
        first when echo is set) of up to max_tokens generated tokens.
    GET /v1/models, GET /health, GET /metrics (Prometheus text: requests and forward passes so far).
Only token-id prompts are accepted (the trainer never sends text). Concurrent requests are batched: a single
worker takes every request waiting in the queue (up to ``max_batch_tokens`` prompt tokens; requests arriving
while a forward pass runs wait for the next) into one forward pass, so the model is never run from two threads at once. A bad request gets a 4xx in vLLM's error format
({"object": "error", "message", "type", "code"}) and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

from ..prompt_scoring import next_token_logits, prompt_logprobs

# Request keys the server understands; others (vLLM's many sampling options) are refused rather than ignored,
# so a client never believes an option took effect when it did not.
KNOWN_KEYS = {"model", "prompt", "max_tokens", "echo", "prompt_logprobs", "temperature", "seed", "logprobs", "n",
              "stream", "user"}


class BadRequest(ValueError):
    """A request the server refuses with a 400 (the message names the field)."""


@dataclass
class ServeOptions:
    model_name: str
    max_logprobs: int = 20          # the largest prompt_logprobs k accepted (vLLM's --max-logprobs)
    max_model_len: int = 2048       # prompt + max_tokens limit
    max_tokens_limit: int = 256     # the largest max_tokens accepted
    max_batch_tokens: int = 8192    # prompt tokens per forward pass
    batch_wait_s: float = 0.0       # how long the worker waits after a request for others to join its batch


@dataclass
class _Job:
    prompts: List[List[int]]
    k: int
    future: asyncio.Future
    results: list = field(default_factory=list)


def _int_list(value, name) -> List[int]:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{name}: expected a non-empty list of token ids")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int):
            raise BadRequest(f"{name}: token ids must be ints, got {t!r}")
    return value


def parse_request(body: Any, opts: ServeOptions, vocab: int) -> dict:
    """Validates a completions request; returns (prompts, k, max_tokens, echo, temperature, seed). Raises
    BadRequest naming the field on anything the server cannot honour exactly."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_KEYS)
    if unknown:
        raise BadRequest(f"unsupported field(s) {unknown}; gopd serve implements {sorted(KNOWN_KEYS)}")
    if body.get("model", opts.model_name) != opts.model_name:
        raise BadRequest(f"model: this server serves {opts.model_name!r}, not {body.get('model')!r}")
    if body.get("stream"):
        raise BadRequest("stream: streaming is not supported")
    if body.get("logprobs") not in (None, 0):
        raise BadRequest("logprobs: log-probs of generated tokens are not supported; use prompt_logprobs")
    if body.get("n", 1) != 1:
        raise BadRequest("n: only n = 1 is supported")
    if "prompt" not in body:
        raise BadRequest("prompt: missing")
    prompt = body["prompt"]
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
        raise BadRequest("prompt: only token-id prompts (a list of ints or a list of such lists) are supported")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        prompts = [_int_list(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    else:
        prompts = [_int_list(prompt, "prompt")]
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"prompt[{i}]: token id {bad[0]} is outside the vocabulary [0, {vocab})")
    k = body.get("prompt_logprobs")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise BadRequest(f"prompt_logprobs: expected an int >= 0, got {k!r}")
        if k > min(opts.max_logprobs, vocab):
            raise BadRequest(f"prompt_logprobs: {k} is more than the server allows "
                             f"(max_logprobs {opts.max_logprobs}, vocabulary {vocab})")
    max_tokens = body.get("max_tokens", 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise BadRequest(f"max_tokens: expected an int >= 0, got {max_tokens!r}")
    if max_tokens > opts.max_tokens_limit:
        raise BadRequest(f"max_tokens: {max_tokens} is more than the server allows ({opts.max_tokens_limit})")
    longest = max(len(p) for p in prompts)
    if longest + max_tokens > opts.max_model_len:
        raise BadRequest(f"prompt: {longest} tokens + max_tokens {max_tokens} exceed max_model_len "
                         f"{opts.max_model_len}")
    temperature = body.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0 \
            or not math.isfinite(temperature):
        raise BadRequest(f"temperature: expected a finite number >= 0, got {temperature!r}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"seed: expected an int, got {seed!r}")
    return dict(prompts=prompts, k=k, max_tokens=max_tokens, echo=bool(body.get("echo", False)),
                temperature=float(temperature), seed=seed)


class TeacherServer:
    """The model, its batching worker and the aiohttp application."""

    def __init__(self, model, tokenizer, opts: ServeOptions):
        self.model, self.tok, self.opts = model, tokenizer, opts
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self.queue: Optional[asyncio.Queue] = None
        self.batches = 0          # forward passes run (a test checks that concurrent requests share one)
        self.requests = 0         # completions requests scored
        self._decoded = {}
        # All model work (scoring batches and generation) runs on this one thread, in arrival order.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gopd-model")

    # ---------------------------------------------------------------- model work (worker thread)
    def _decode(self, tid: int) -> str:
        if tid not in self._decoded:
            self._decoded[tid] = self.tok.decode([tid])
        return self._decoded[tid]

    def _score_batch(self, jobs: List[_Job]) -> None:
        prompts = [p for job in jobs for p in job.prompts]
        k = max((job.k or 0) for job in jobs)
        scored = prompt_logprobs(self.model, prompts, k, pad_id=self.pad_id)
        i = 0
        for job in jobs:
            job.results = scored[i:i + len(job.prompts)]
            i += len(job.prompts)

    def _entries(self, prompt: List[int], pl, k: int) -> list:
        """vLLM's prompt_logprobs list for one prompt."""
        out: list = [None]
        for j in range(len(prompt) - 1):
            entry = {}
            for r in range(k):
                tid = int(pl.topk_ids[j, r])
                entry[str(tid)] = dict(logprob=float(pl.topk_logprobs[j, r]), rank=r + 1,
                                       decoded_token=self._decode(tid))
            tid = prompt[j + 1]
            if str(tid) not in entry:
                entry[str(tid)] = dict(logprob=float(pl.actual[j]), rank=int(pl.rank[j]),
                                       decoded_token=self._decode(tid))
            out.append(entry)
        return out

    def _generate(self, prompt: List[int], first_logits, max_tokens: int, temperature: float, seed) -> tuple:
        """Up to max_tokens tokens (greedy at temperature 0, else sampled); the first from the scoring pass's
        logits, each later one from a forward pass over the sequence so far."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        ids, finish = list(prompt), "length"
        for step in range(max_tokens):
            z = first_logits if step == 0 else next_token_logits(self.model, ids).cpu()
            if temperature == 0:
                t = int(z.argmax())
            else:
                t = int(torch.multinomial(torch.softmax(z / temperature, -1), 1, generator=gen))
            ids.append(t)
            if t == self.eos_id:
                finish = "stop"
                break
        return ids[len(prompt):], finish

    # ---------------------------------------------------------------- asyncio side
    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            tokens = sum(map(len, jobs[0].prompts))
            if self.opts.batch_wait_s:
                await asyncio.sleep(self.opts.batch_wait_s)
            while not self.queue.empty() and tokens < self.opts.max_batch_tokens:
                job = self.queue.get_nowait()
                jobs.append(job)
                tokens += sum(map(len, job.prompts))
            try:
                await loop.run_in_executor(self.executor, self._score_batch, jobs)
                self.batches += 1
                self.requests += len(jobs)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_result(job.results)
            except Exception as e:  # a failed forward fails its requests, never the server
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)

    async def completions(self, request):
        from aiohttp import web

        try:
            body = json.loads(await request.text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"the request body is not valid JSON: {e}")
        try:
            req = parse_request(body, self.opts, self.vocab)
        except BadRequest as e:
            return _error(400, str(e))
        job = _Job(req["prompts"], req["k"], asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        try:
            scored = await job.future
        except Exception as e:
            return _error(500, f"scoring failed: {type(e).__name__}: {e}", kind="InternalServerError")
        choices, completion_tokens = [], 0
        loop = asyncio.get_running_loop()
        for i, (prompt, pl) in enumerate(zip(req["prompts"], scored)):
            new, finish = await loop.run_in_executor(self.executor, self._generate, prompt, pl.next_logits,
                                                     req["max_tokens"], req["temperature"], req["seed"])
            completion_tokens += len(new)
            text = self.tok.decode(new)
            if req["echo"]:
                text = self.tok.decode(prompt) + text
            choices.append(dict(index=i, text=text, logprobs=None, finish_reason=finish, stop_reason=None,
                                prompt_logprobs=None if req["k"] is None else self._entries(prompt, pl, req["k"])))
        n_prompt = sum(map(len, req["prompts"]))
        return web.json_response(dict(
            id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()),
            model=self.opts.model_name, choices=choices,
            usage=dict(prompt_tokens=n_prompt, completion_tokens=completion_tokens,
                       total_tokens=n_prompt + completion_tokens)))

    async def models(self, request):
        from aiohttp import web

        return web.json_response(dict(object="list", data=[dict(
            id=self.opts.model_name, object="model", created=int(time.time()), owned_by="gopd",
            root=self.opts.model_name, max_model_len=self.opts.max_model_len)]))

    async def health(self, request):
        from aiohttp import web

        return web.Response(status=200)

    async def metrics(self, request):
        from aiohttp import web

        text = (f"# TYPE gopd_requests_total counter\ngopd_requests_total {self.requests}\n"
                f"# TYPE gopd_forward_passes_total counter\ngopd_forward_passes_total {self.batches}\n")
        return web.Response(text=text, content_type="text/plain")

    def app(self):
        from aiohttp import web

        async def start_worker(app):
            self.queue = asyncio.Queue()
            task = asyncio.create_task(self._worker())
            yield
            task.cancel()

        # Bodies of a few MB are plenty for token-id prompts; aiohttp answers larger ones with a 413.
        app = web.Application(client_max_size=16 << 20, middlewares=[_json_errors_factory()])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.cleanup_ctx.append(start_worker)
        return app


def _error(code: int, message: str, kind: str = "BadRequestError"):
    from aiohttp import web

    return web.json_response(dict(object="error", message=message, type=kind, param=None, code=code), status=code)


def _json_errors_factory():
    from aiohttp import web

    @web.middleware
    async def json_errors(request, handler):
        """aiohttp's own 4xx (unknown route, wrong method, body too large) in the same JSON error format."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status >= 400:
                return _error(e.status, e.reason or "error", kind="HTTPError")
            raise

    return json_errors


async def serve_forever(server: TeacherServer, host: str, port: int, announce=print) -> None:
    """Runs until cancelled (SIGINT / SIGTERM); announces the bound address (port 0 picks a free one)."""
    from aiohttp import web

    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    announce(f"gopd serve: {server.opts.model_name} listening on http://{host}:{bound}")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run(spec, *, host: str = "127.0.0.1", port: int = 8000, name: Optional[str] = None, device: str = "cpu",
        max_logprobs: int = 20, max_batch_tokens: int = 8192, max_model_len: Optional[int] = None,
        batch_wait_s: float = 0.0) -> None:
    """Loads `spec` (any model spec gopd loads) and serves it until SIGINT / SIGTERM."""
    import signal

    from ..models import freeze, load_model

    model, tok = load_model(spec, device)
    freeze(model)
    limit = max_model_len or int(getattr(model.config, "max_position_embeddings", 2048))
    opts = ServeOptions(model_name=name or (spec if isinstance(spec, str) else "gopd-teacher"),
                        max_logprobs=max_logprobs, max_model_len=limit, max_batch_tokens=max_batch_tokens, batch_wait_s=batch_wait_s)
    server = TeacherServer(model, tok, opts)

    async def main():
        task = asyncio.create_task(serve_forever(server, host, port, announce=lambda s: print(s, flush=True)))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(main())
