"""The thin trainer (python/gopd) on tiny random Llamas: end to end, resume, routing, reference, errors."""

import copy
import itertools
import json
import math
import os

import pytest
import torch

from helpers import LossRecorder, need  # noqa: E402

need("transformers")
need("yaml")

from gopd import config as config_mod  # noqa: E402
from gopd import frozen_scoring  # noqa: E402
from gopd import trainer as trainer_mod  # noqa: E402
from gopd.data import DataError, load_jsonl  # noqa: E402
from gopd.eval import extract_answer, is_correct  # noqa: E402
from gopd.models import ModelError  # noqa: E402
from gopd.rollout import HFRollout  # noqa: E402
from gopd.scoring import base_model  # noqa: E402

SMOKE = os.path.join(os.path.dirname(__file__), "..", "configs", "smoke.yaml")
TIMING = {"time_s", "rollout_s", "tokens_per_s", "peak_mem_mb"}


def smoke_cfg(tmp_path, *overrides):
    return config_mod.load(SMOKE, (f"out_dir={tmp_path}", "eval_teachers=false", "n_eval=2",
                                   "eval_max_new_tokens=4") + overrides)


def rows_of(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def logprobs_by_logits(model, prompt, response):
    """Plain-transformers scoring of one sequence: log softmax(logits)[y] of each response token."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: len(prompt) - 1 + len(response)].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


Recorder = LossRecorder


def test_smoke_end_to_end(tmp_path):
    cfg = smoke_cfg(tmp_path, "steps=2")
    rows = trainer_mod.Trainer(cfg).train()
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert math.isfinite(r["loss"]) and r["n_tokens"] > 0 and not r.get("skipped")
        for key in ("reward", "kl", "advantage", "entropy", "tokens_per_s", "peak_mem_mb", "grad_norm"):
            assert math.isfinite(r[key]), key
    assert rows_of(tmp_path / "metrics.jsonl") == rows
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "config.yaml").exists()
    # The per-step loss is the token mean of -A (on-policy, IS weight 1 up to rounding): check the sign logic.
    assert abs(rows[1]["loss"] + rows[1]["advantage"]) < 1e-4


def test_training_changes_student_and_reference_stays(tmp_path):
    trainer = trainer_mod.Trainer(smoke_cfg(tmp_path, "steps=1"))
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    ref_before = {k: v.clone() for k, v in trainer.reference.state_dict().items()}
    trainer.train_step()
    after = trainer.student.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(ref_before[k], v) for k, v in trainer.reference.state_dict().items())
    assert not any(p.requires_grad for p in trainer.reference.parameters())
    assert not any(p.requires_grad for p in trainer.default_teacher.parameters())


def test_resume_reproduces_next_step(tmp_path):
    full = smoke_cfg(tmp_path / "full", "steps=3", "save_every=0")
    trainer_mod.Trainer(full).train()
    part = smoke_cfg(tmp_path / "part", "steps=2", "save_every=1")
    trainer_mod.Trainer(part).train()
    resumed = smoke_cfg(tmp_path / "part", "steps=3", "save_every=1")
    trainer_mod.Trainer(resumed, resume=True).train()

    def strip(rows):  # the interrupted run also evaluated at its last step (2): compare training metrics
        return [{k: v for k, v in r.items() if k not in TIMING | {"accuracy"}} for r in rows]

    a, b = rows_of(tmp_path / "full" / "metrics.jsonl"), rows_of(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    assert strip(a) == strip(b)  # bit-identical losses, rewards, gradient norms
    assert a[-1]["accuracy"] == b[-1]["accuracy"]


def test_multi_teacher_routing_by_domain(tmp_path, monkeypatch):
    teachers = "teachers={add: {tiny: {hidden_size: 16}, seed: 11}, mul: {tiny: {hidden_size: 24}, seed: 12}}"
    cfg = smoke_cfg(tmp_path, teachers, "synthetic_ops=[add, mul]", "steps=1", "micro_batch_size=8",
                    "batch_size=6", "lam=1.0")
    trainer = trainer_mod.Trainer(cfg)
    rec = Recorder(monkeypatch)
    trainer.train_step()
    assert len(rec.calls) == 2  # one micro-batch per domain
    heads = {dom: t.get_output_embeddings().weight for dom, t in trainer.teachers.items()}
    seen = set()
    for args, kwargs, out in rec.calls:
        teacher_weight = kwargs["teacher_weight"]
        dom = next(d for d, w in heads.items() if w is teacher_weight)
        seen.add(dom)
        # Score the call's tokens with that domain's teacher by plain logits, and with the other teacher.
        y = args[2].tolist()
        other = trainer.teachers["mul" if dom == "add" else "add"]
        own_lp, other_lp = [], []
        # Rebuild the sequences: the recorder does not know the prompts, so rescore the step's batch.
        for ex_prompt, resp in trainer._last_scored[dom]:
            own_lp.append(logprobs_by_logits(trainer.teachers[dom], ex_prompt, resp))
            other_lp.append(logprobs_by_logits(other, ex_prompt, resp))
        own_lp, other_lp = torch.cat(own_lp), torch.cat(other_lp)
        assert len(y) == own_lp.numel()
        torch.testing.assert_close(out.lp_t.double(), own_lp, atol=1e-4, rtol=1e-4)
        assert (out.lp_t.double() - other_lp).abs().max() > 1e-2
    assert seen == {"add", "mul"}


def test_reward_correction_uses_given_reference(tmp_path, monkeypatch):
    ref_spec = "reference={tiny: {hidden_size: 32, num_hidden_layers: 2}, seed: 7}"
    trainer = trainer_mod.Trainer(smoke_cfg(tmp_path, ref_spec, "steps=1", "micro_batch_size=8"))
    rec = Recorder(monkeypatch)
    trainer.train_step()
    (args, kwargs, out), = rec.calls
    assert kwargs["ref_weight"] is trainer.reference.get_output_embeddings().weight
    from gopd.models import tiny_llama
    expected_ref = tiny_llama({"hidden_size": 32, "num_hidden_layers": 2}, seed=7)
    expected = torch.cat([logprobs_by_logits(expected_ref, p, r) for p, r in trainer._last_scored["add"]])
    torch.testing.assert_close(out.lp_r.double(), expected, atol=1e-4, rtol=1e-4)
    # ... and not the student's initial weights (the default reference).
    default = tiny_llama({"hidden_size": 32, "num_hidden_layers": 2}, seed=0)
    wrong = torch.cat([logprobs_by_logits(default, p, r) for p, r in trainer._last_scored["add"]])
    assert (out.lp_r.double() - wrong).abs().max() > 1e-2


def test_nan_loss_skips_then_stops(tmp_path, monkeypatch):
    cfg = smoke_cfg(tmp_path, "steps=5", "max_bad_steps=2", "save_every=1")
    trainer = trainer_mod.Trainer(cfg)
    trainer.train_step()
    trainer.save()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    real = trainer_mod.gk.fused_linear_gopd_loss

    def nan_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_mod.gk, "fused_linear_gopd_loss", nan_loss)
    with pytest.raises(trainer_mod.TrainingStopped, match="2 non-finite steps in a row"):
        trainer.train()
    rows = rows_of(tmp_path / "metrics.jsonl")
    assert rows[-1]["skipped"] and math.isnan(rows[-1]["loss"])
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    # Skipped steps leave the weights untouched (step 2 was checkpointed after its skip; step 3 stopped the run).
    assert kept["step"] == 2 and all(torch.equal(saved[k], v) for k, v in kept["model"].items())


def test_unknown_key_names_closest():
    with pytest.raises(config_mod.ConfigError, match="did you mean 'lam'"):
        config_mod.load(SMOKE, ("lamm=1.25",))
    with pytest.raises(config_mod.ConfigError, match="did you mean 'micro_batch_size'"):
        config_mod.from_dict({"micro_batchsize": 2})
    with pytest.raises(config_mod.ConfigError, match="mode"):
        config_mod.load(SMOKE, ("mode=sparse",))


def test_float_keys_take_exponent_literals_and_name_bad_values(tmp_path):
    # PyYAML reads 3e-5 (no dot) as a string, in a file and in --set alike.
    assert config_mod.load(SMOKE, ("lr=3e-5",)).lr == 3e-5
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3e-5\nlam: 2\nteachers: {add: {sft: smollm2, lr: 5e-5}}\n")
    cfg = config_mod.load(str(path))
    assert cfg.lr == 3e-5 and cfg.lam == 2
    from gopd.sft import check_spec
    assert check_spec(cfg.teachers["add"], "teachers.add")["lr"] == 5e-5
    for bad, name in (("lr=fast", "lr"), ("lam=true", "lam"), ("grad_clip=[1]", "grad_clip")):
        with pytest.raises(config_mod.ConfigError, match=f"^{name} must be a number"):
            config_mod.load(SMOKE, (bad,))


def test_cli_reports_config_error(capsys):
    from gopd.cli import main
    assert main(["train", "--config", SMOKE, "--set", "learning_rate=1"]) == 2
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?", \n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        load_jsonl(str(path))
    path.write_text('{"answer": "2"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: give exactly one of 'prompt'"):
        load_jsonl(str(path))
    path.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_jsonl(str(path))
    path.write_text('{"messages": [{"role": "user", "content": "3+4?"}], "answer": 7, "domain": "add"}\n')
    (ex,) = load_jsonl(str(path))
    assert ex.answer == "7" and ex.domain == "add" and ex.user_text() == "3+4?"


def test_eval_set_without_answers(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text('{"prompt": "hi"}\n')
    with pytest.raises(DataError, match="without an 'answer'"):
        trainer_mod.Trainer(smoke_cfg(tmp_path, f"eval_data={path}"))


def test_vocab_mismatch_refused_and_padding_accepted(tmp_path):
    with pytest.raises(ModelError, match="fewer than the student's"):
        trainer_mod.Trainer(smoke_cfg(tmp_path, "teacher={tiny: {vocab_size: 50}, seed: 1}"))
    trainer = trainer_mod.Trainer(smoke_cfg(tmp_path, "teacher={tiny: {vocab_size: 128}, seed: 1}", "steps=1"))
    row = trainer.train_step()  # padded teacher head: the common prefix is used
    assert math.isfinite(row["loss"])


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        trainer_mod.Trainer(smoke_cfg(tmp_path, f"teacher={tmp_path}/nope.gguf"))


def test_verifier():
    assert extract_answer("so the answer is \\boxed{42}.") == "42"
    assert extract_answer("23 + 48 = 71") == "71"
    assert is_correct("The result is 1,234", "1234")
    assert not is_correct("23 + 48 = 109", "71")
    assert not is_correct("no number", "3")


@pytest.mark.parametrize("name", ["smoke", "demo", "multi_teacher", "reward_correction"])
def test_example_configs_parse(name):
    cfg = config_mod.load(os.path.join(os.path.dirname(SMOKE), f"{name}.yaml"))
    assert cfg.steps >= 1


def test_rollout_logprobs_match_hidden_state_scoring():
    """The sampler's log-probs (left-padded KV-cache decoding) equal the fused op's log-probs on the
    scorer's hidden states (right-padded full forward), for prompts of different lengths."""
    import gopd_kernels as gk
    from gopd.models import lm_head, tiny_llama
    from gopd.rollout import HFRollout
    from gopd.scoring import response_hidden, targets_of

    model = tiny_llama({}, seed=3).eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]
    gen = torch.Generator().manual_seed(0)
    roll = HFRollout().generate(model, prompts, max_new_tokens=6, eos_id=1, pad_id=0, generator=gen)
    with torch.no_grad():
        h = response_hidden(model, prompts, roll.responses, pad_id=0)
        w, _ = lm_head(model)
        lp = gk.fused_linear_logprobs(h, w, targets_of(roll.responses, "cpu"))
    expected = torch.tensor([x for r in roll.logprobs for x in r])
    torch.testing.assert_close(lp, expected, atol=1e-4, rtol=1e-4)


def test_teacher_context_changes_teacher_scores(tmp_path, monkeypatch):
    """teacher_context=solution: the teacher (a frozen copy of the student here) scores the student's
    tokens under a prompt that contains the answer, so lp_t differs from the student's own lp_s."""
    from gopd.data import Example, privileged
    ex = Example(prompt="What is 2 + 3?", answer="5", domain="add")
    assert "5" in privileged(ex, "solution").prompt and privileged(ex, "none") is ex
    assert privileged(ex, "examples").prompt.endswith(ex.prompt)
    trainer = trainer_mod.Trainer(smoke_cfg(tmp_path, "teacher=null", "teacher_context=solution", "lam=1.0",
                                            "steps=1"))
    assert trainer.teacher_prompt(ex) != trainer.codec.prompt_ids(ex)
    rec = Recorder(monkeypatch)
    trainer.train_step()
    out = rec.calls[0][2]
    assert (out.lp_t - out.lp_s).abs().max() > 1e-4


class ShiftedRollout(HFRollout):
    """hf rollouts whose reported log-probs are shifted per token, as if another engine (vLLM in bf16,
    say) had sampled: the truncated IS weight w = min(exp(lp_s - lp_rollout), is_cap) is then off 1."""

    shifts = (-1.5, 0.0, 0.6, -0.4, -3.0)

    def generate(self, *args, **kwargs):
        roll = super().generate(*args, **kwargs)
        if not kwargs.get("greedy"):
            it = itertools.cycle(self.shifts)
            roll.logprobs = [[lp + next(it) for lp in r] for r in roll.logprobs]
            self.last = roll
        return roll


def off_policy_step(tmp_path, *overrides):
    """One step with lr = 0 and no grad clipping: returns (trainer, row, {param name: grad})."""
    cfg = smoke_cfg(tmp_path, "lr=0", "grad_clip=1.0e9", "steps=1", *overrides)
    trainer = trainer_mod.Trainer(cfg)
    trainer.engine = ShiftedRollout()
    row = trainer.train_step()
    assert math.isfinite(row["loss"]) and not row.get("skipped")
    return trainer, row, {k: p.grad.clone() for k, p in trainer.student.named_parameters()}


def test_off_policy_step_matches_reference_by_hand(tmp_path):
    """The step's loss and every parameter gradient equal gopd_kernels.reference.gopd_loss on logits
    materialised by plain transformers forwards of the same tokens, with the engine's (shifted) log-probs
    as rollout_logprobs: the trainer passes the right tensors, lam, clip, dual clip and is_cap."""
    from gopd_kernels.reference import gopd_loss

    trainer, row, grads = off_policy_step(tmp_path / "a", "is_cap=2.0", "clip_eps=0.1", "dual_clip=2.0")
    cfg, scored = trainer.cfg, trainer._last_scored["add"]  # one domain: scoring order = batch order
    assert [r for _, r in scored] == trainer.engine.last.responses
    student = copy.deepcopy(trainer.student)  # lr = 0: still the weights the step differentiated
    student.zero_grad(set_to_none=True)

    def logits(model, p, r):
        return model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1: len(p) - 1 + len(r)]

    with torch.no_grad():
        zt = torch.cat([logits(trainer.default_teacher, p, r) for p, r in scored])
        zr = torch.cat([logits(trainer.reference, p, r) for p, r in scored])
    zs = torch.cat([logits(student, p, r) for p, r in scored])
    y = torch.tensor([t for _, r in scored for t in r])
    rollout_lp = torch.tensor([x for lp in trainer.engine.last.logprobs for x in lp])
    out = gopd_loss(zs, y, zt, zr, lam=cfg.lam, rollout_logprobs=rollout_lp, clip_eps=cfg.clip_eps,
                    dual_clip=cfg.dual_clip, is_cap=cfg.is_cap, num_items_in_batch=row["n_tokens"])
    # The shifts really put IS weights off 1 and some at the cap.
    assert (out.is_weight - 1).abs().max() > 0.3 and bool((out.is_weight == cfg.is_cap).any())
    out.loss.backward()
    assert abs(row["loss"] - float(out.loss.detach())) < 1e-5
    for name, p in student.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_rollout_logprobs_weight_on_policy_clip_is_inert(tmp_path):
    """One update per batch is strictly on-policy (lp_old = lp_s detached, docs/design.md §1): ratio = 1, so
    clip_eps / dual_clip leave the gradient unchanged, while the rollout log-probs act through the
    truncated IS weight: changing is_cap changes the gradient."""
    _, _, base = off_policy_step(tmp_path / "a", "is_cap=2.0", "clip_eps=0.1", "dual_clip=2.0")
    _, _, clip = off_policy_step(tmp_path / "b", "is_cap=2.0", "clip_eps=0.3", "dual_clip=5.0")
    _, _, cap = off_policy_step(tmp_path / "c", "is_cap=10.0", "clip_eps=0.1", "dual_clip=2.0")
    for name in base:
        torch.testing.assert_close(base[name], clip[name], atol=1e-7, rtol=1e-6, msg=name)
    assert max(float((base[k] - cap[k]).abs().max()) for k in base) > 1e-4


def test_updates_per_batch_passes_first_pass_logprobs_as_old_and_clip_acts(tmp_path, monkeypatch):
    """updates_per_batch = 2: the first pass over a batch is on-policy (old_logprobs None); the second
    passes the first pass's lp_s of the same micro-batch as old_logprobs, after an optimizer step, so the
    ratio moves off 1; the frozen models score each batch once; clip_eps then changes the update."""
    rec = Recorder(monkeypatch)
    trainer = trainer_mod.Trainer(smoke_cfg(tmp_path / "a", "steps=1", "updates_per_batch=2", "lr=0.05"))
    teacher_calls = []
    base_model(trainer.default_teacher).register_forward_hook(lambda *a: teacher_calls.append(1))
    row = trainer.train_step()
    assert row["updates"] == 2 and math.isfinite(row["loss_last"])
    n_groups = len(rec.calls) // 2
    assert n_groups >= 2 and len(rec.calls) == 2 * n_groups and len(teacher_calls) == n_groups
    first, second = rec.calls[:n_groups], rec.calls[n_groups:]
    for (_, kw1, out1), (_, kw2, out2) in zip(first, second):
        assert kw1["old_logprobs"] is None
        torch.testing.assert_close(kw2["old_logprobs"], out1.lp_s.detach(), atol=0, rtol=0)
    ratio = torch.cat([(out2.lp_s - kw2["old_logprobs"]).exp() for _, kw2, out2 in second])
    assert float((ratio - 1).abs().max()) > 0.2  # outside the clip range: clipping has work to do

    def final_weights(sub, *over):
        t = trainer_mod.Trainer(smoke_cfg(tmp_path / sub, "steps=1", "updates_per_batch=2", "lr=0.05", *over))
        t.train_step()
        return {k: v.detach().clone() for k, v in t.student.named_parameters()}

    tight, loose = final_weights("b", "clip_eps=0.05"), final_weights("c", "clip_eps=0.95", "dual_clip=1000.0")
    assert max(float((tight[k] - loose[k]).abs().max()) for k in tight) > 1e-6


def test_updates_per_batch_must_be_positive(tmp_path):
    with pytest.raises(config_mod.ConfigError, match="updates_per_batch"):
        smoke_cfg(tmp_path, "updates_per_batch=0")


def test_bf16_autocast_step(tmp_path, monkeypatch):
    """bf16 = true on CPU: the models' forwards run under bf16 autocast (and it changes their hidden
    states), the fused loss gets float32 inputs outside autocast, the loss is finite, and weights,
    gradients and AdamW state stay float32."""
    trainer = trainer_mod.Trainer(smoke_cfg(tmp_path, "bf16=true", "steps=1"))
    hidden_calls, loss_calls = [], []
    real_hidden, real_loss = trainer_mod.response_hidden, trainer_mod.gk.fused_linear_gopd_loss

    def hidden(model, prompts, responses, pad_id):
        h = real_hidden(model, prompts, responses, pad_id)
        hidden_calls.append((torch.is_autocast_enabled("cpu"), model, prompts, responses, h.detach()))
        return h

    def loss(*args, **kwargs):
        loss_calls.append((torch.is_autocast_enabled("cpu"), args[0].dtype, args[1].dtype,
                           kwargs["teacher_hidden"].dtype))
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "response_hidden", hidden)  # the student's forward
    monkeypatch.setattr(frozen_scoring, "response_hidden", hidden)  # the teacher's and the reference's
    monkeypatch.setattr(trainer_mod.gk, "fused_linear_gopd_loss", loss)
    row = trainer.train_step()
    assert math.isfinite(row["loss"]) and not row.get("skipped")
    assert len(hidden_calls) == 3 * len(loss_calls) and all(c[0] for c in hidden_calls)
    assert set(loss_calls) == {(False, torch.float32, torch.float32, torch.float32)}
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trainer.student.parameters())
    assert all(v.dtype == torch.float32 for s in trainer.optimizer.state.values() for k, v in s.items()
               if k != "step")
    # Autocast took effect: the (unchanged, frozen) reference's hidden states differ from a float32 forward.
    _, model, prompts, responses, h_bf16 = next(c for c in hidden_calls if c[1] is trainer.reference)
    with torch.no_grad():
        h_fp32 = real_hidden(model, prompts, responses, trainer.codec.pad_id)
    diff = float((h_bf16.float() - h_fp32).abs().max())
    assert 1e-4 < diff < 0.2 * float(h_fp32.abs().max())


def test_progress_bars_quiet_without_tty_or_when_off():
    import io

    from gopd.progress import progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, progress, shown in ((Terminal(), True, True), (io.StringIO(), True, False),
                                    (Terminal(), False, False)):
        assert list(progress_bar(range(3), progress=progress, desc="scoring", file=stream)) == [0, 1, 2]
        assert ("scoring" in stream.getvalue()) == shown


class RaggedRollout(ShiftedRollout):
    """ShiftedRollout whose responses are cut to ragged lengths (one empty): the sequence reductions then
    differ from the token mean, and a micro-batch's own sequence count from the step's."""

    lengths = (8, 0, 3, 5)

    def generate(self, *args, **kwargs):
        roll = super().generate(*args, **kwargs)
        if not kwargs.get("greedy"):
            cut = itertools.cycle(self.lengths)
            for i, n in enumerate(next(cut) for _ in roll.responses):
                roll.responses[i], roll.logprobs[i] = roll.responses[i][:n], roll.logprobs[i][:n]
        return roll


def reference_step(tmp_path, *overrides):
    """One step on ragged rollouts (batch 4, micro-batches of 2, grad_clip off), each optimizer.step seen:
    returns (trainer, row, [(the student's weights before that step, {name: grad})])."""
    cfg = smoke_cfg(tmp_path, "grad_clip=1.0e9", "steps=1", *overrides)
    trainer = trainer_mod.Trainer(cfg)
    trainer.engine = RaggedRollout()
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda *_: seen.append((
        copy.deepcopy(trainer.student), {k: p.grad.clone() for k, p in trainer.student.named_parameters()})))
    row = trainer.train_step()
    assert math.isfinite(row["loss"]) and not row.get("skipped")
    return trainer, row, seen


@pytest.mark.parametrize("reduction, advantage_from, updates", [
    ("seq-mean-token-mean", "current", 1), ("seq-mean-token-sum", "current", 1), ("mean", "old", 2),
    ("seq-mean-token-mean", "old", 2)])
def test_reduction_and_advantage_from_match_reference_by_hand(tmp_path, reduction, advantage_from, updates):
    """The last update's loss and every student gradient equal gopd_kernels.reference.gopd_loss on [B, T]
    logits of plain transformers forwards of the whole step (ragged responses, one empty, two micro-batches):
    the sequence reductions are over the step's responses (not each micro-batch's), and with
    updates_per_batch = 2, advantage_from old takes lp_old = the first pass's log-probs."""
    from torch.nn.utils.rnn import pad_sequence

    from gopd_kernels.reference import gopd_loss

    lr = "lr=0.05" if updates > 1 else "lr=0"
    trainer, row, seen = reference_step(tmp_path, f"reduction={reduction}", f"advantage_from={advantage_from}",
                                        f"updates_per_batch={updates}", lr)
    assert len(seen) == updates
    cfg, scored = trainer.cfg, trainer._last_scored["add"]
    responses = [r for _, r in scored]
    assert responses == trainer.engine.last.responses and sorted(map(len, responses)) == [0, 3, 5, 8]

    def logits(model, grad=False):
        with torch.set_grad_enabled(grad):
            return pad_sequence([model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1: len(p) - 1 + len(r)]
                                 for p, r in scored], batch_first=True)

    def padded(rows, fill=0.0):
        return pad_sequence([torch.tensor(r, dtype=torch.float32 if fill == 0.0 else torch.long) for r in rows],
                            batch_first=True, padding_value=fill)

    y = padded(responses, fill=-100)
    zt, zr = logits(trainer.default_teacher), logits(trainer.reference)
    student, grads = seen[-1]
    old = None
    if updates > 1:  # lp_old: the first pass's student, which is also the one that sampled
        first = logits(seen[0][0]).log_softmax(-1)
        old = first.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != -100)
    kw = dict(lam=cfg.lam, rollout_logprobs=padded(trainer.engine.last.logprobs), old_logprobs=old,
              clip_eps=cfg.clip_eps, dual_clip=cfg.dual_clip, is_cap=cfg.is_cap, reduction=reduction)
    out = gopd_loss(logits(student, grad=True), y, zt, zr, advantage_from=advantage_from, **kw)
    out.loss.backward()
    loss = row["loss_last"] if updates > 1 else row["loss"]
    assert abs(loss - float(out.loss.detach())) < 1e-5, (loss, float(out.loss))
    for name, p in student.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    # The options matter here: the token mean, or the advantage from the current policy, is another step.
    other = dict(kw, reduction="mean") if reduction != "mean" else kw
    other_adv = "current" if advantage_from == "old" else advantage_from
    wrong = gopd_loss(logits(student), y, zt, zr, advantage_from=other_adv, **other).loss.detach()
    assert abs(float(wrong) - float(out.loss)) > 1e-3


@pytest.mark.parametrize("key, value, match", [
    ("reduction", "sum", "reduction: expected one of mean, seq-mean-token-mean, seq-mean-token-sum, got 'sum'"),
    ("reduction", "seq-mean", "reduction: expected one of"),
    ("advantage_from", "rollout", "advantage_from: expected one of current, old, got 'rollout'"),
    ("mode", "sparse", "mode: expected one of sampled, full, topk"),
])
def test_loss_option_errors_name_the_key(tmp_path, key, value, match):
    with pytest.raises(config_mod.ConfigError, match=match):
        smoke_cfg(tmp_path, f"{key}={value}")


def test_advantage_from_old_needs_sampled_mode(tmp_path):
    with pytest.raises(config_mod.ConfigError, match="advantage_from: 'old' applies to mode 'sampled'"):
        smoke_cfg(tmp_path, "advantage_from=old", "mode=full")
