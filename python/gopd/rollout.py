"""Rollout engines: the student samples responses and reports the sampler's log-probs.

``RolloutEngine.generate(model, prompts, ...)`` takes prompt token id lists and returns a
``Rollouts``: response ids (ending at eos when it was sampled) and per-token log-probs
log softmax(logits / T)[y] of the sampler. ``generator`` is one torch.Generator for the whole batch, or a
list of one per prompt: then prompt i's tokens depend only on its own generator, not on which other prompts
share the batch (the trainer seeds one per prompt of the global batch, so splitting the prompts over
data-parallel ranks samples the same tokens as one process). Two engines:

* ``hf`` (default): a plain KV-cache decoding loop on a transformers model, so sampling is seeded by
  our own torch.Generator and exactly reproducible; it shares the trainer's weights.
* ``vllm`` (optional extra ``pip install .[vllm]``): vLLM's offline ``LLM`` engine holding its own
  copy of the student, refreshed from the trainer by ``sync_weights`` before each step's rollouts.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import List, Optional

import torch

from .config import VLLM_RESERVED
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
    """Callable run by vLLM on its model object in each worker: model.load_weights((name, tensor) ...).

    A module-level class (not a lambda) so vLLM can pickle it to worker processes; vLLM's models
    take Hugging Face parameter names here and do their own renaming / fusing (qkv, gate_up)."""

    def __init__(self, weights):
        self.weights = weights

    def __call__(self, model):
        model.load_weights(weights=iter(self.weights))


class VLLMEngine(RolloutEngine):
    """Rollouts on vLLM's offline ``LLM`` engine, with the student's weights pushed in every step.

    UNVERIFIED: no real vLLM can be installed where this was written. The code follows vLLM's
    documented offline API of the V1 engine, vLLM 0.10.2 - 0.11 (``LLM(model=DIR,
    skip_tokenizer_init=True, logprobs_mode="processed_logprobs", ...)``, ``LLM.generate`` on
    ``{"prompt_token_ids": ids}`` prompts with ``SamplingParams(n=1, temperature, max_tokens,
    logprobs=0, seed, stop_token_ids)``, ``RequestOutput.outputs[0].token_ids / .logprobs``,
    ``LLM.apply_model`` and ``LLM.reset_prefix_cache``), and it is tested only against a stand-in
    module with that surface (tests/test_rollout_vllm.py). Older versions lack ``logprobs_mode``
    (before 0.10.2) or ``apply_model`` (before about 0.8.5); V0-era code reached the model through
    ``llm.llm_engine.model_executor.driver_worker.model_runner.model`` instead, which is not done here.

    Life cycle. The first ``sync_weights(student)`` writes the student with ``save_pretrained`` to
    a temporary folder and starts ``LLM`` on it (token ids in and out, so no tokenizer is loaded);
    later calls send the student's current parameters to vLLM's model with
    ``apply_model(model.load_weights)`` and reset the prefix cache (cached KV blocks were computed
    with the old weights). ``generate`` on any other model (a teacher being evaluated) uses the hf
    engine, so only one vLLM instance ever holds GPU memory.

    Log-probs. vLLM's V1 sampler returns log-probs of the raw logits by default; the trainer needs
    those of logits / temperature (what was actually sampled from), hence
    ``logprobs_mode="processed_logprobs"``. No top-k / top-p / penalties are set, so the processed
    distribution is exactly softmax(logits / T) and the log-probs have the hf engine's format.

    Weight transfer. Parameters are copied to CPU and handed over in-process: the engine sets
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (unless the environment already sets it) so ``apply_model``
    runs in this process. That is simple and fine for small students on one GPU; large
    tensor-parallel students want vLLM's NCCL weight-update path (its RLHF examples) instead.
    """

    name = "vllm"

    def __init__(self, *, seed: int = 0, dtype: str = "auto", gpu_memory_utilization: float = 0.3,
                 **llm_kwargs):
        reserved = sorted(set(llm_kwargs) & VLLM_RESERVED)
        if reserved:
            raise ValueError(f"VLLMEngine: {reserved} are set by the engine itself")
        self.vllm = import_vllm()
        self.llm_kwargs = dict(dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                               skip_tokenizer_init=True, enforce_eager=True,
                               logprobs_mode="processed_logprobs")
        self.llm_kwargs.update(llm_kwargs)
        self.llm = None
        self.model = None          # the trainer's model this engine serves (the student)
        self.n_syncs = 0           # weight pushes after the start (for logs and tests)
        self._hf = HFRollout()

    def _start(self, model) -> None:
        folder = tempfile.mkdtemp(prefix="gopd-vllm-")
        weakref.finalize(self, shutil.rmtree, folder, True)
        model.save_pretrained(folder, safe_serialization=True)
        # In-process engine core: apply_model then runs here, no pickling of the weights (see class doc).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.llm = self.vllm.LLM(model=folder, **self.llm_kwargs)
        self.model = model

    def sync_weights(self, model) -> None:
        if self.llm is None:
            self._start(model)
            return
        if model is not self.model:
            raise ValueError("the vllm engine serves one model (the student it was started with); "
                             f"sync_weights got a different {type(model).__name__}")
        weights = [(name, p.detach().to("cpu")) for name, p in model.named_parameters()]
        self.llm.apply_model(_LoadWeights(weights))
        self.llm.reset_prefix_cache()
        self.n_syncs += 1

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
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=progress)
        responses, logprobs = [], []
        for out in outputs:
            ids, lps = _completion(out.outputs[0], eos_id)
            responses.append(ids)
            logprobs.append(lps)
        return Rollouts(responses, logprobs)


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
    """The rollout engine `name`; `options` are extra vllm.LLM arguments (vllm only)."""
    if name == "hf":
        if options:
            raise ValueError(f"rollout engine 'hf' takes no options, got {sorted(options)}")
        return HFRollout()
    if name == "vllm":
        return VLLMEngine(seed=seed, **(options or {}))
    raise ValueError(f"unknown rollout engine {name!r}: expected 'hf' or 'vllm'")
