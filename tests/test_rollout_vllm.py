"""The vllm rollout engine's plumbing, against a stand-in ``vllm`` module (runs without vLLM).

The stand-in implements only the surface the engine uses: ``LLM(model=DIR, **kwargs)`` loading the
folder the engine wrote, ``LLM.generate`` on ``{"prompt_token_ids": ...}`` prompts with one
``SamplingParams`` per prompt, ``RequestOutput.outputs[0].token_ids / .logprobs``,
``collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`` (vLLM 0.32's in-place reload; the
"0.11" flavour's ``reload_weights`` takes no iterator, as there, so the engine falls back to
``apply_model(model.load_weights)``), ``apply_model`` and ``reset_prefix_cache``. Like vLLM's V1 sampler
it returns raw-logit log-probs unless the engine asks for ``logprobs_mode="processed_logprobs"``. It
samples with its own plain (no KV cache) loop, so these tests check the plumbing (ids in, ids + sampler
log-probs out in the hf engine's format, weights pushed every step, the sync check, errors), not vLLM
itself: tests/test_vllm_real.py runs the engine on a real vLLM.
"""

import math
import os
import sys
import types

import pytest
import torch

from helpers import need  # noqa: E402

need("transformers")
need("yaml")

import gopd_kernels as gk  # noqa: E402
from gopd import config as config_mod  # noqa: E402
from gopd import trainer as trainer_mod  # noqa: E402
from gopd.models import lm_head, tiny_llama  # noqa: E402
from gopd.rollout import VLLMEngine, VLLMSyncError, make_engine, sync_probe  # noqa: E402
from gopd.scoring import response_hidden, targets_of  # noqa: E402

SMOKE = os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.yaml")


class Logprob:
    def __init__(self, logprob):
        self.logprob = logprob


class SamplingParams:
    FIELDS = {"n", "temperature", "max_tokens", "logprobs", "seed", "stop_token_ids"}

    def __init__(self, **kwargs):
        unknown = set(kwargs) - self.FIELDS
        assert not unknown, f"the stand-in does not know SamplingParams{sorted(unknown)}"
        self.__dict__.update(dict(n=1, temperature=1.0, max_tokens=16, logprobs=None, seed=None,
                                  stop_token_ids=[]), **kwargs)


class WorkerModel:
    """What apply_model hands its function: vLLM's model object, with load_weights((name, tensor) ...)."""

    def __init__(self, hf):
        self.hf = hf
        self.loads = 0

    def load_weights(self, weights):
        weights = dict(weights)
        own = dict(self.hf.named_parameters())
        assert set(weights) == set(own), "load_weights got other parameter names than the model's"
        with torch.no_grad():
            for name, tensor in weights.items():
                assert tensor.device.type == "cpu"
                own[name].copy_(tensor)
        self.loads += 1


class LLM:
    instances = []
    api = "0.32"          # "0.11": reload_weights() takes no iterator there

    def __init__(self, model, **kwargs):
        from transformers import AutoModelForCausalLM

        assert os.path.isfile(os.path.join(model, "config.json")), "LLM(model=...) needs a model folder"
        self.kwargs = kwargs
        self.worker = WorkerModel(AutoModelForCausalLM.from_pretrained(model).eval())
        self.requests = []           # (prompts, sampling params) per generate call
        self.weights_at_generate = []
        self.prefix_resets = 0
        self.reloads = 0
        self.checks = 0
        LLM.instances.append(self)

    def apply_model(self, func):
        return [func(self.worker)]

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert method == "reload_weights", method
        if self.api == "0.11" and kwargs:
            raise TypeError(f"reload_weights() got an unexpected keyword argument {sorted(kwargs)[-1]!r}")
        assert kwargs["is_checkpoint_format"] is True
        self.worker.load_weights(kwargs["weights_iterator"])
        self.reloads += 1
        return [None]

    def reset_prefix_cache(self):
        self.prefix_resets += 1
        return True

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm=True):
        vocab = self.worker.hf.config.vocab_size
        if [p["prompt_token_ids"] for p in prompts] == [sync_probe(vocab)]:
            self.checks += 1      # the engine's sync check: not a rollout
        else:
            self.requests.append((prompts, sampling_params))
            self.weights_at_generate.append({k: v.clone() for k, v in self.worker.hf.named_parameters()})
        processed = self.kwargs.get("logprobs_mode") == "processed_logprobs"
        outs = []
        for prompt, sp in zip(prompts, sampling_params):
            gen = torch.Generator().manual_seed(sp.seed if sp.seed is not None else 0)
            ids, steps = list(prompt["prompt_token_ids"]), []
            for _ in range(sp.max_tokens):
                logits = self.worker.hf(input_ids=torch.tensor([ids])).logits[0, -1].double()
                raw = logits.log_softmax(-1)
                if sp.temperature == 0:
                    tok, logp = int(raw.argmax()), raw
                else:
                    scaled = (logits / sp.temperature).log_softmax(-1)
                    tok = int(torch.multinomial(scaled.exp(), 1, generator=gen))
                    logp = scaled if processed else raw
                ids.append(tok)
                steps.append({tok: Logprob(float(logp[tok]))})
                if tok in sp.stop_token_ids:
                    break
            n = len(steps)
            outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tuple(ids[-n:]),
                                                                               logprobs=steps)]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch, request):
    LLM.instances = []
    monkeypatch.setattr(LLM, "api", getattr(request, "param", "0.32"))
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_missing_vllm_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ImportError, match=r"pip install \.\[vllm\]"):
        make_engine("vllm")
    cfg = config_mod.load(SMOKE, (f"out_dir={tmp_path}", "rollout_engine=vllm"))
    with pytest.raises(ImportError, match="rollout_engine: vllm"):
        trainer_mod.Trainer(cfg)


def test_rollouts_are_ids_and_sampler_logprobs(fake_vllm):
    """Prompt ids go in as token prompts; ids and log-probs of logits / T come out, equal to what the
    fused op scores on the same model (the hf engine's contract); greedy maps to temperature 0."""
    model = tiny_llama({}, seed=3).eval()
    engine = VLLMEngine(seed=0)
    engine.sync_weights(model)
    (llm,) = LLM.instances
    assert llm.kwargs["skip_tokenizer_init"] and llm.kwargs["logprobs_mode"] == "processed_logprobs"
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]
    roll = engine.generate(model, prompts, max_new_tokens=6, eos_id=1, pad_id=0, temperature=0.7,
                           generator=torch.Generator().manual_seed(0))
    sent, params = llm.requests[-1]
    assert sent == [{"prompt_token_ids": p} for p in prompts]
    assert [(p.n, p.logprobs, p.max_tokens, p.temperature, p.stop_token_ids) for p in params] == \
        [(1, 0, 6, 0.7, [1])] * 3
    assert len({p.seed for p in params}) == 3  # one seed per request
    assert all(isinstance(t, int) for r in roll.responses for t in r)
    assert [len(r) for r in roll.responses] == [len(lp) for lp in roll.logprobs]
    assert all(len(r) == 6 or r[-1] == 1 for r in roll.responses)
    with torch.no_grad():
        h = response_hidden(model, prompts, roll.responses, pad_id=0)
        lp = gk.fused_linear_logprobs(h, lm_head(model)[0], targets_of(roll.responses, "cpu"), 0.7)
    torch.testing.assert_close(lp.double(), torch.tensor([x for r in roll.logprobs for x in r],
                                                         dtype=torch.float64), atol=1e-4, rtol=1e-4)
    engine.generate(model, prompts, max_new_tokens=3, eos_id=1, pad_id=0, greedy=True)
    assert {p.temperature for p in llm.requests[-1][1]} == {0.0}


def test_other_models_use_the_hf_engine(fake_vllm):
    student, teacher = tiny_llama({}, seed=3), tiny_llama({}, seed=4)
    engine = VLLMEngine()
    engine.sync_weights(student)
    roll = engine.generate(teacher, [[5, 6]], max_new_tokens=3, eos_id=1, pad_id=0, greedy=True)
    assert LLM.instances[0].requests == [] and len(roll.responses[0]) >= 1
    with pytest.raises(ValueError, match="serves one model"):
        engine.sync_weights(teacher)


@pytest.mark.parametrize("fake_vllm", ["0.32", "0.11"], indirect=True)
def test_trainer_pushes_weights_every_step(tmp_path, fake_vllm, monkeypatch):
    cfg = config_mod.load(SMOKE, (f"out_dir={tmp_path}", "rollout_engine=vllm", "eval_teachers=false",
                                  "n_eval=2", "eval_max_new_tokens=4", "micro_batch_size=4"))
    trainer = trainer_mod.Trainer(cfg)
    calls = []
    real = trainer_mod.gk.fused_linear_gopd_loss
    monkeypatch.setattr(trainer_mod.gk, "fused_linear_gopd_loss",
                        lambda *a, **k: calls.append((k, real(*a, **k))) or calls[-1][1])
    snapshots = []
    for _ in range(3):
        snapshots.append({k: v.detach().clone() for k, v in trainer.student.named_parameters()})
        row = trainer.train_step()
        assert math.isfinite(row["loss"]) and not row.get("skipped")
    (llm,) = LLM.instances
    # Each step's rollouts were sampled with the student's weights of that moment ...
    assert len(llm.weights_at_generate) == 3
    for before, used in zip(snapshots, llm.weights_at_generate):
        assert all(torch.equal(before[k], used[k]) for k in before)
    assert any(not torch.equal(snapshots[0][k], snapshots[2][k]) for k in snapshots[0])
    # ... pushed once per step after the first (the first started the engine from save_pretrained), through
    # the in-place reload where vLLM has it, and checked against the student after the start and every push.
    assert llm.worker.loads == 2 and llm.prefix_resets == 2 and trainer.engine.n_syncs == 2
    assert llm.reloads == (2 if llm.api == "0.32" else 0)   # 0.11: one refused try, then load_weights
    assert llm.checks == 3 and len(trainer.engine.sync_errors) == 3 and max(trainer.engine.sync_errors) < 1e-4
    # The sampler's log-probs reached the loss as rollout_logprobs and equal the student's own scores
    # (on-policy, so the truncated IS weight is 1).
    for kwargs, out in calls:
        torch.testing.assert_close(kwargs["rollout_logprobs"].double(), out.lp_s.double(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.is_weight.double(), torch.ones_like(out.is_weight.double()),
                                   atol=1e-4, rtol=0)
    # Evaluation after a step sees the new weights too.
    trainer.evaluate_student()
    assert llm.worker.loads == 3
    final = llm.weights_at_generate[-1]
    assert all(torch.equal(v.detach(), final[k]) for k, v in trainer.student.named_parameters())


def test_vllm_options_reach_the_engine_and_bad_ones_are_clear_errors(tmp_path, fake_vllm):
    """`vllm:` in the config passes extra arguments to vllm.LLM (overriding the engine's defaults); the
    arguments the engine relies on, options without the vllm engine, or a non-mapping are errors."""
    cfg = config_mod.load(SMOKE, (f"out_dir={tmp_path}", "rollout_engine=vllm",
                                  "vllm={gpu_memory_utilization: 0.55, enforce_eager: false, max_model_len: 512}"))
    engine = make_engine(cfg.rollout_engine, seed=cfg.seed, options=cfg.vllm)
    engine.sync_weights(tiny_llama({}, seed=3))
    (llm,) = LLM.instances
    assert llm.kwargs["gpu_memory_utilization"] == 0.55 and llm.kwargs["enforce_eager"] is False
    assert llm.kwargs["max_model_len"] == 512 and llm.kwargs["logprobs_mode"] == "processed_logprobs"
    with pytest.raises(config_mod.ConfigError, match="rollout_engine is 'hf'"):
        config_mod.load(SMOKE, (f"out_dir={tmp_path}", "vllm={dtype: bfloat16}"))
    with pytest.raises(config_mod.ConfigError, match="set by the engine itself"):
        config_mod.load(SMOKE, (f"out_dir={tmp_path}", "rollout_engine=vllm", "vllm={logprobs_mode: raw_logprobs}"))
    with pytest.raises(config_mod.ConfigError, match="vllm must be a mapping"):
        config_mod.load(SMOKE, (f"out_dir={tmp_path}", "rollout_engine=vllm", "vllm=0.5"))
    with pytest.raises(ValueError, match="set by the engine itself"):
        VLLMEngine(model="/elsewhere")
    with pytest.raises(ValueError, match="takes no options"):
        make_engine("hf", options={"dtype": "bfloat16"})


def test_a_stale_sync_is_a_clear_error_not_a_silent_policy(fake_vllm, monkeypatch):
    """A push that leaves vLLM's old weights in place (here: the stand-in drops them) fails the sync check
    with an error naming the difference and the tolerance; the start's own check passes."""
    monkeypatch.setattr(WorkerModel, "load_weights", lambda self, weights: None)
    model = tiny_llama({}, seed=3).eval()
    engine = VLLMEngine(seed=0)
    engine.sync_weights(model)
    assert engine.engine_dtype == "float32" and engine.sync_tolerance == 1e-3 and engine.sync_errors[0] < 1e-4
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    with pytest.raises(VLLMSyncError, match=r"weight sync 1: .* differ from the student's by up to .* above "
                                            r"sync_tolerance 0\.001 \(engine dtype float32\)"):
        engine.sync_weights(model)


def test_engine_dtype_kv_cache_and_sync_options(tmp_path, fake_vllm):
    """The engine runs in the student's dtype unless told otherwise; sync_tolerance / sync_check_tokens are
    the engine's own options (not passed to vllm.LLM), checked like every other option."""
    engine = VLLMEngine(seed=0)
    engine.sync_weights(tiny_llama({}, seed=3).to(torch.float64))
    assert LLM.instances[-1].kwargs["dtype"] == "float64"
    cfg = config_mod.load(SMOKE, (f"out_dir={tmp_path}", "rollout_engine=vllm",
                                  "vllm={dtype: bfloat16, sync_tolerance: 0.5, sync_check_tokens: 3}"))
    engine = make_engine(cfg.rollout_engine, seed=cfg.seed, options=cfg.vllm)
    engine.sync_weights(tiny_llama({}, seed=3))
    kwargs = LLM.instances[-1].kwargs
    assert kwargs["dtype"] == "bfloat16" and "sync_tolerance" not in kwargs and "sync_check_tokens" not in kwargs
    assert engine.sync_tolerance == 0.5 and engine.sync_check_tokens == 3
    assert VLLMEngine(dtype="bfloat16").sync_tolerance is None   # set at the start: 0.25 for 16-bit engines
    for bad, word in ((dict(sync_tolerance=0), "sync_tolerance"), (dict(sync_tolerance="x"), "sync_tolerance"),
                      (dict(sync_check_tokens=0), "sync_check_tokens")):
        with pytest.raises(ValueError, match=word):
            VLLMEngine(**bad)


def test_bench_rollout_quick(tmp_path):
    """benchmarks/bench_rollout.py --quick runs (hf engine; its vllm row needs the vLLM venv) and writes its JSON."""
    import json
    import subprocess

    root = os.path.join(os.path.dirname(__file__), "..")
    out = tmp_path / "rollout.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, "python")]))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_rollout.py"), "--quick",
                           "--engines", "hf", "--reps", "1", "--steps", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["engine"] == "hf" and row["rollout_tokens"] > 0 and row["step_s"] > 0
