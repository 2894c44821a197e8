"""gopd.integrations.trl on tiny random Llamas (built here, nothing downloaded), CPU.

End to end: a few optimizer steps of GOPDTrainer; the token count of the mean is the generated tokens of
the whole step. On a fixed batch its loss and gradients equal gopd's own trainer's pieces (scoring.
response_hidden + fused_linear_gopd_loss) and the float64 reference on logits. The sampler's log-probs
reach the loss as the importance weight; off-policy sampling settings are refused.
"""

import copy
import warnings

import pytest
import torch

from helpers import need

need("trl")
need("datasets")
tokenizers = need("tokenizers")

from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import gopd_kernels as gk  # noqa: E402
from gopd.integrations.trl import GOPDConfig, GOPDTrainer  # noqa: E402
from gopd.scoring import response_hidden  # noqa: E402
from gopd_kernels import reference  # noqa: E402

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 "
VOCAB = 64  # the models' vocabulary; the tokenizer uses its first len(CHARS) + 2 ids
PAD, EOS = 0, 1


def tokenizer():
    vocab = {"<pad>": PAD, "<eos>": EOS, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def tiny(seed, sharpen=1.0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=PAD,
                                         eos_token_id=EOS, bos_token_id=None))
    with torch.no_grad():  # a teacher with sharper opinions than the near-uniform random student
        model.model.norm.weight.mul_(sharpen)
    return model


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                max_steps=2, max_completion_length=6, learning_rate=1e-3, logging_steps=1, report_to="none",
                save_strategy="no", use_cpu=True, seed=0)
    return GOPDConfig(**{**base, **kw})


def trainer(tmp_path, ref_model=None, **kw):
    data = Dataset.from_dict({"prompt": ["abc", "hello wor", "12 34", "xyz q"] * 2})
    return GOPDTrainer(tiny(0), tiny(1, sharpen=8.0), ref_model=ref_model, args=config(tmp_path, **kw),
                       train_dataset=data, processing_class=tokenizer())


def test_trains_with_the_step_token_count_rollout_logprobs_and_the_initial_student_as_reference(tmp_path):
    tr = trainer(tmp_path, lam=1.25, mode="sampled", gradient_accumulation_steps=2, max_steps=2)
    initial = {k: v.clone() for k, v in tr.model.state_dict().items()}
    seen = []
    inner, generate = tr._compute_loss, tr._generate_single_turn

    def fake_lp(token, j):  # a made-up sampler log-prob that identifies its token and position
        return -0.01 * token - 0.001 * j

    def generating(*a, **kw):  # a generator that reports its log-probs, as the vLLM path does
        ids = generate(*a, **kw)
        tr.record_rollout_logprobs([[fake_lp(t, j) for j, t in enumerate(c)] for c in ids])
        return ids

    def recording(student, inputs, num_items_in_batch):
        seen.append((int(inputs["completion_mask"].sum()), float(num_items_in_batch)))
        # The log-probs stayed with their tokens through TRL's shuffle and micro-batch split.
        mask = inputs["completion_mask"].bool()
        j = torch.arange(mask.shape[1]).expand_as(mask)
        want = fake_lp(inputs["completion_ids"], j).float()
        torch.testing.assert_close(inputs["rollout_logprobs"][mask], want[mask])
        return inner(student, inputs, num_items_in_batch)

    tr._generate_single_turn, tr._compute_loss = generating, recording
    tr.train()
    logs = [row for row in tr.state.log_history if "loss" in row]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in logs)
    assert {"gopd/reward", "gopd/kl", "gopd/advantage", "gopd/is_weight", "entropy"} <= set(logs[0])
    # Each optimizer step is 2 micro-batches; both divide by the generated tokens of the two together.
    assert len(seen) == 4
    for a, b in (seen[0:2], seen[2:4]):
        assert a[1] == b[1] == a[0] + b[0], seen
    # The default reference is the student as passed in; the student itself moved.
    ref = tr.ref_model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in initial.items())
    assert any(not torch.equal(tr.model.state_dict()[k], v) for k, v in initial.items())


def test_a_student_given_by_path_is_loaded_again_as_the_reference(tmp_path):
    tiny(0).save_pretrained(tmp_path / "student")
    tr = GOPDTrainer(str(tmp_path / "student"), tiny(1), args=config(tmp_path, lam=1.25),
                     train_dataset=Dataset.from_dict({"prompt": ["abc"]}), processing_class=tokenizer())
    assert tr.ref_model is not tr.model and not any(p.requires_grad for p in tr.ref_model.parameters())
    ref = tr.ref_model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in tr.model.state_dict().items())


def fixed_batch():
    """Prompts of different lengths (left-padded, as TRL does) and completions of different lengths
    (right-padded), with the sampler's log-probs of each completion token, as one micro-batch of a step."""
    prompts = [[5, 9, 12], [7, 3, 3, 20, 11], [30]]
    completions = [[4, 17, 33, 50, EOS], [8, 8], [61, 2, 44, 9]]
    rollout = [[-3.1, -4.0, -4.5, -2.2, -4.1], [-5.0, -3.9], [-4.2, -4.3, -1.0, -4.0]]
    P, C = max(map(len, prompts)), max(map(len, completions))
    inputs = dict(prompt_ids=torch.full((3, P), PAD), prompt_mask=torch.zeros(3, P, dtype=torch.long),
                  completion_ids=torch.full((3, C), PAD), completion_mask=torch.zeros(3, C, dtype=torch.long),
                  rollout_logprobs=torch.zeros(3, C))
    for i, (p, c, r) in enumerate(zip(prompts, completions, rollout)):
        inputs["prompt_ids"][i, P - len(p):] = torch.tensor(p)
        inputs["prompt_mask"][i, P - len(p):] = 1
        inputs["completion_ids"][i, :len(c)] = torch.tensor(c)
        inputs["completion_mask"][i, :len(c)] = 1
        inputs["rollout_logprobs"][i, :len(r)] = torch.tensor(r)
    # The step's other micro-batches hold 5 more generated tokens: the mean is over the step's tokens.
    inputs["num_items_in_batch"] = torch.tensor(sum(map(len, completions)) + 5)
    return prompts, completions, rollout, inputs


def student_grads(model):
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("mode", ["sampled", "full"])
def test_loss_and_gradients_equal_gopds_trainer_objective(tmp_path, mode):
    lam, temp = 1.25, 0.7
    # A reference that is neither the student nor the teacher, so every term of the objective acts.
    tr = trainer(tmp_path, ref_model=tiny(2), lam=lam, mode=mode, temperature=temp)
    prompts, completions, rollout, inputs = fixed_batch()
    n = sum(map(len, completions)) + 5
    student, teacher, ref = tr.model, tr.teacher_model, tr.ref_model
    student.train()
    loss = tr.compute_loss(student, inputs)
    loss.backward()
    got = student_grads(student)

    # gopd's trainer (python/gopd/trainer.py): hidden states of the response tokens, right padding, fused loss
    # with the step's response-token count.
    y = torch.tensor([t for c in completions for t in c])
    with torch.no_grad():
        h_t = response_hidden(teacher, prompts, completions, PAD)
        h_r = response_hidden(ref, prompts, completions, PAD)
    out = gk.fused_linear_gopd_loss(
        response_hidden(student, prompts, completions, PAD), student.lm_head.weight, y, h_t, teacher.lm_head.weight,
        h_r, ref.lm_head.weight, lam=lam, mode=mode, temperature=temp, num_items_in_batch=n,
        rollout_logprobs=torch.tensor([v for r in rollout for v in r]))
    out.loss.backward()
    want = student_grads(student)
    torch.testing.assert_close(loss.detach(), out.loss.detach(), rtol=1e-5, atol=1e-6)
    assert set(got) == set(want) and len(got) > 3
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)

    # The float64 oracle on full-sequence logits of each unpadded example.
    def logits64(model):
        m = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            return torch.cat([m(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:len(p) - 1 + len(c)]
                              for p, c in zip(prompts, completions)])
    oracle = reference.gopd_loss(logits64(student), y, logits64(teacher), logits64(ref), lam=lam, mode=mode,
                                 temperature=temp, num_items_in_batch=n,
                                 rollout_logprobs=torch.tensor([v for r in rollout for v in r], dtype=torch.float64))
    value = float(loss.detach())
    assert abs(value - float(oracle.loss)) < 1e-5 * max(1.0, abs(float(oracle.loss))), (value, oracle.loss)
    # The importance weight acts: without the sampler's log-probs the loss differs (by ~6e-4 in sampled mode,
    # far above the ~1e-7 float32 noise).
    del inputs["rollout_logprobs"]
    assert abs(float(tr.compute_loss(student, inputs).detach()) - value) > 1e-4


def test_rollout_logprobs_from_the_generator_reach_the_batch(tmp_path):
    tr = trainer(tmp_path, lam=1.0, per_device_train_batch_size=4)
    made = []
    inner = tr._generate_single_turn

    def generating(*a, **kw):  # a generator that reports its log-probs, as the vLLM path does
        ids = inner(*a, **kw)
        made.append([[-1.0 - 0.5 * j for j in range(len(c))] for c in ids])
        tr.record_rollout_logprobs(made[-1])
        return ids

    tr._generate_single_turn = generating
    out = tr._generate_and_score_completions([{"prompt": p} for p in ["abc", "hello", "1", "xyz q"]])
    mask = out["completion_mask"]
    assert out["rollout_logprobs"].shape == mask.shape
    for row, lps, m in zip(out["rollout_logprobs"], made[0], mask):
        assert row[:int(m.sum())].tolist() == lps and not row[int(m.sum()):].any()

    tr._generate_single_turn = lambda *a, **kw: [ids[:-1] or [EOS] for ids in generating(*a, **kw)]
    with pytest.raises(RuntimeError, match="rollout log-probs do not match"):
        tr._generate_and_score_completions([{"prompt": "abcd"}])


@pytest.mark.parametrize("reduction, advantage_from", [
    ("seq-mean-token-mean", "current"), ("seq-mean-token-sum", "current"), ("mean", "old"),
    ("seq-mean-token-mean", "old")])
def test_reduction_and_advantage_from_equal_the_reference(tmp_path, reduction, advantage_from):
    """The loss and gradients of one micro-batch equal the float64 oracle on [B, C] logits with the same
    options: the sequence reductions divide by the generation batch's non-empty completions (here 3 + 2 in
    the step's other micro-batches), and advantage_from="old" is the advantage of the policy that sampled,
    which in TRL's one optimizer step per generation batch is the student being trained."""
    from torch.nn.utils.rnn import pad_sequence

    lam = 1.25
    tr = trainer(tmp_path, ref_model=tiny(2), lam=lam, mode="sampled", reduction=reduction,
                 advantage_from=advantage_from)
    prompts, completions, rollout, inputs = fixed_batch()
    inputs["num_sequences_in_batch"] = torch.tensor(len(completions) + 2)
    student = tr.model
    student.train()
    loss = tr.compute_loss(student, inputs)
    loss.backward()
    got = student_grads(student)

    def logits64(model, grad=False):
        with torch.set_grad_enabled(grad):
            return pad_sequence([model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:len(p) - 1 + len(c)]
                                 for p, c in zip(prompts, completions)], batch_first=True)

    s64 = copy.deepcopy(student).double()
    y = pad_sequence([torch.tensor(c) for c in completions], batch_first=True, padding_value=-100)
    roll = pad_sequence([torch.tensor(r, dtype=torch.float64) for r in rollout], batch_first=True)
    old = None
    if advantage_from == "old":  # the sampler's policy, as the trainer recomputes it: the current student
        old = logits64(s64).log_softmax(-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != -100)
    count = dict(num_sequences_in_batch=len(completions) + 2) if reduction != "mean" else dict(
        num_items_in_batch=int(inputs["num_items_in_batch"]))
    kw = dict(lam=lam, mode="sampled", rollout_logprobs=roll, reduction=reduction, **count)
    oracle = reference.gopd_loss(logits64(s64, grad=True), y, logits64(copy.deepcopy(tr.teacher_model).double()),
                                 logits64(copy.deepcopy(tr.ref_model).double()), advantage_from=advantage_from,
                                 old_logprobs=old, **kw)
    oracle.loss.backward()
    value = float(oracle.loss.detach())
    assert abs(float(loss.detach()) - value) < 1e-5 * max(1.0, abs(value))
    want = {k: p.grad for k, p in s64.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and len(got) > 3
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-4, atol=1e-6, msg=k)
    if reduction != "mean":  # the generation batch's count, not this micro-batch's 3 completions
        local = reference.gopd_loss(logits64(s64), y, logits64(copy.deepcopy(tr.teacher_model).double()),
                                    logits64(copy.deepcopy(tr.ref_model).double()), lam=lam, rollout_logprobs=roll,
                                    reduction=reduction).loss
        assert abs(float(local) - value) > 1e-3


def test_sequence_count_spans_the_generation_batch(tmp_path):
    """reduction seq-mean-token-mean under gradient accumulation: every micro-batch of an optimizer step
    divides by the non-empty completions of the whole generation batch."""
    tr = trainer(tmp_path, lam=1.0, reduction="seq-mean-token-mean", gradient_accumulation_steps=2, max_steps=1)
    seen, inner = [], tr._compute_loss

    def recording(student, inputs, num_items_in_batch):
        seen.append((int((inputs["completion_mask"].sum(1) > 0).sum()), int(inputs["num_sequences_in_batch"])))
        return inner(student, inputs, num_items_in_batch)

    tr._compute_loss = recording
    tr.train()
    assert len(seen) == 2 and seen[0][1] == seen[1][1] == seen[0][0] + seen[1][0] == 4, seen


@pytest.mark.parametrize("kw, match", [
    (dict(reduction="sum"), "reduction: expected one of"),
    (dict(advantage_from="rollout"), "advantage_from: expected one of"),
    (dict(advantage_from="old", mode="full"), "advantage_from: 'old' applies to mode 'sampled'"),
    (dict(lam="1.25"), "lam: expected a finite number"),
    (dict(lam=float("nan")), "lam: expected a finite number"),
    (dict(mode="topk"), "mode: expected one of"),
    (dict(is_cap=0), "is_cap: expected a number > 0"),
    (dict(beta=0.5), "beta: TRL's JSD"),
    (dict(top_p=0.9), "off-policy: top_p=0.9"),
    (dict(top_k=20), "top_k=20"),
    (dict(temperature=0.7, generation_kwargs={"temperature": 1.0}), "differs from the loss temperature 0.7"),
    (dict(generation_kwargs={"do_sample": False}), "greedy"),
])
def test_config_refuses_what_the_loss_cannot_mean(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kw)


def test_off_policy_sampling_can_be_accepted_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="off-policy: top_p=0.9"):
        config(tmp_path, top_p=0.9, allow_off_policy_sampling=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        config(tmp_path, temperature=0.7)  # on-policy at any temperature: no warning


def test_trainer_arguments_are_checked(tmp_path):
    from trl import DistillationConfig

    data = Dataset.from_dict({"prompt": ["abc"]})
    with pytest.raises(TypeError, match="args: expected a GOPDConfig"):
        GOPDTrainer(tiny(0), tiny(1), args=DistillationConfig(output_dir=str(tmp_path), use_cpu=True),
                    train_dataset=data, processing_class=tokenizer())
    with pytest.raises(ValueError, match="teacher_model: G-OPD needs a teacher"):
        GOPDTrainer(tiny(0), None, args=config(tmp_path), train_dataset=data, processing_class=tokenizer())
    with pytest.raises(TypeError, match="ref_model: expected a model or a model path"):
        GOPDTrainer(tiny(0), tiny(1), ref_model=3, args=config(tmp_path, lam=1.25), train_dataset=data,
                    processing_class=tokenizer())
    soft = tiny(1)
    soft.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="teacher_model: .*final_logit_softcapping"):
        GOPDTrainer(tiny(0), soft, args=config(tmp_path), train_dataset=data, processing_class=tokenizer())
