"""Distillation measurably works: the real trainer moves a tiny student towards a teacher that differs from
it in a known way, measured on held-out prompts by independent scoring (gopd.metrics: the models' own
forwards, not the loss's diagnostics).

Student: a random tiny Llama (initializer_range 0.2, so its next-token distributions depend on the context).
Teachers: the same weights changed in a known way (gopd.models.tiny_from_spec):
  * sharpen 3: the teacher's logits are 3x the student's initial logits, p_t ∝ p_s0^3 at every position.
    OPD's optimum is the teacher itself; ExOPD's (lam = 1.25, pi_r = the initial student) is
    p_t^1.25 p_r^-0.25 ∝ p_s0^3.5, a little beyond it, so KL(student || teacher) falls for both.
    The teacher's preference depends on the context, so a student scored against the wrong position
    (targets shifted by one) or pushed the wrong way (a flipped gradient) does not get closer.
  * logit_bias: per domain, +3 on the logits of digits (add) or of the letters a-j (mul): a student
    trained with routing must move each domain towards its own teacher and away from the other one.

Margins (stated, and checked to fail on a broken gradient): the reverse KL on held-out prompts falls to at
most 40% of its initial value (measured: 1.80 -> 0.31-0.60 after 10 steps); with routing, each domain's KL to its own teacher falls to at most half and
ends below half its KL to the other domain's teacher.
"""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("yaml")

from gopd import config as config_mod  # noqa: E402
from gopd.trainer import Trainer  # noqa: E402

STUDENT = "{tiny: {initializer_range: 0.2}, seed: 0}"
SHARP_TEACHER = "{tiny: {initializer_range: 0.2}, seed: 0, sharpen: 3}"
ADD_TEACHER = "{tiny: {initializer_range: 0.2}, seed: 0, logit_bias: {'0123456789': 3}}"
MUL_TEACHER = "{tiny: {initializer_range: 0.2}, seed: 0, logit_bias: {abcdefghij: 3}}"


def learning_cfg(tmp_path, *overrides):
    return config_mod.load(None, (
        f"out_dir={tmp_path}", f"student={STUDENT}", "n_train=64", "n_eval=32", "n_eval_kl=16",
        "max_new_tokens=8", "eval_max_new_tokens=1",  # accuracy means nothing here; KL is the measure
        "batch_size=8", "micro_batch_size=8", "lr=0.01", "eval_teachers=false", "save_final_model=false",
        "progress=false", "threads=1") + overrides)


@pytest.mark.parametrize("mode", ["sampled", "full"])
@pytest.mark.parametrize("lam", [1.0, 1.25])
def test_student_moves_towards_sharpened_teacher(tmp_path, mode, lam):
    cfg = learning_cfg(tmp_path, f"teacher={SHARP_TEACHER}", f"mode={mode}", f"lam={lam}", "steps=10")
    rows = Trainer(cfg).train()
    before, after = rows[0]["kl_to_teacher"], rows[-1]["kl_to_teacher"]
    # The two differ in a known way: at the start the KL is that of p to p^3 / Z, well above 0.
    assert before > 1.0, before
    assert after <= 0.4 * before, f"{mode}, lam={lam}: KL(student || teacher) {before:.3f} -> {after:.3f}"


def test_routing_moves_each_domain_towards_its_own_teacher(tmp_path):
    cfg = learning_cfg(tmp_path, f"teachers={{add: {ADD_TEACHER}, mul: {MUL_TEACHER}}}",
                       "synthetic_ops=[add, mul]", "mode=full", "lam=1.0", "steps=40")
    trainer = Trainer(cfg)
    other = {"add": trainer.teachers["mul"], "mul": trainer.teachers["add"]}
    own_before = trainer.kl_to_teachers()
    trainer.train()
    own_after = trainer.kl_to_teachers()
    other_after = trainer.kl_to_teachers(teacher_of=other.get)
    for dom in ("add", "mul"):
        assert own_after[dom] <= 0.5 * own_before[dom], (dom, own_before, own_after)
        assert own_after[dom] <= 0.5 * other_after[dom], (dom, own_after, other_after)


# ------------------------------------------------------------------ the pieces the learning test relies on

def test_known_teachers_differ_exactly_as_stated():
    import torch

    from gopd.models import load_model

    student, _ = load_model({"tiny": {"initializer_range": 0.2}, "seed": 0})
    sharp, _ = load_model({"tiny": {"initializer_range": 0.2}, "seed": 0, "sharpen": 3})
    biased, tok = load_model({"tiny": {"initializer_range": 0.2}, "seed": 0, "logit_bias": {"09": 2.5}})
    ids = torch.tensor([tok.encode("What is 3 + 4?")])
    with torch.no_grad():
        z, z_sharp, z_bias = (m(input_ids=ids).logits for m in (student, sharp, biased))
    torch.testing.assert_close(z_sharp, 3 * z, rtol=1e-5, atol=1e-5)
    bias = torch.zeros(z.shape[-1])
    bias[tok.encode("09")] = 2.5
    torch.testing.assert_close(z_bias, z + bias, rtol=1e-5, atol=1e-5)
    # tied embeddings stay tied: the biased head's weight is the embedding matrix itself
    assert biased.get_output_embeddings().weight is biased.get_input_embeddings().weight


@pytest.mark.parametrize("spec, word", [
    ({"tiny": {}, "sharpen": 0}, "sharpen"),
    ({"tiny": {}, "logit_bias": {"€": 1.0}}, "logit_bias"),
    ({"tiny": {}, "logit_bias": {"a": "x"}}, "logit_bias"),
    ({"tiny": {}, "sharpn": 2}, "sharpn"),
])
def test_bad_tiny_spec_is_a_clear_error(spec, word):
    from gopd.models import ModelError, load_model

    with pytest.raises(ModelError, match=word):
        load_model(spec)


def test_kl_metric_matches_closed_form_for_a_biased_teacher():
    """Teacher = student + bias b: per position KL(p_s || p_t) = log E_{p_s}[e^b] - E_{p_s}[b] exactly."""
    import torch

    from gopd.data import synthetic_arithmetic
    from gopd.metrics import kl_to_teacher, reverse_kl, token_logprobs
    from gopd.models import Codec, load_model
    from gopd.rollout import HFRollout

    spec = {"tiny": {"initializer_range": 0.2}, "seed": 0}
    student, tok = load_model(spec)
    teacher, _ = load_model(dict(spec, logit_bias={"0123456789": 3.0}))
    codec, engine = Codec(tok), HFRollout()
    examples = synthetic_arithmetic(5, digits=2, seed=3)
    prompts = [codec.prompt_ids(ex) for ex in examples]
    responses = [tok.encode("12 ab"), tok.encode("7"), tok.encode("x = 9"), tok.encode("0"), tok.encode("z1")]
    b = torch.zeros(len(tok), dtype=torch.float64)
    b[tok.encode("0123456789")] = 3.0
    lp_s = token_logprobs(student, prompts, responses, codec.pad_id)
    lp_t = token_logprobs(teacher, prompts, responses, codec.pad_id)
    for a, t in zip(lp_s, lp_t):
        p = a.exp()
        expected = torch.log((p * b.exp()).sum(-1)) - (p * b).sum(-1)
        torch.testing.assert_close(reverse_kl(a, t), expected, rtol=1e-6, atol=1e-6)  # fp32 logits
    # The sampled metric: 0 against the student itself, > 0 against the biased teacher, reproducible.
    kw = dict(max_new_tokens=6, seed=5)
    assert kl_to_teacher(student, student, codec, engine, examples, **kw) == pytest.approx(0.0, abs=1e-12)
    first = kl_to_teacher(student, teacher, codec, engine, examples, **kw)
    assert first > 0.1 and first == kl_to_teacher(student, teacher, codec, engine, examples, **kw)
    with pytest.raises(ValueError, match="examples"):
        kl_to_teacher(student, teacher, codec, engine, [], **kw)


def test_synthetic_eval_set_is_held_out(tmp_path):
    cfg = learning_cfg(tmp_path, "synthetic_digits=1", "n_train=40", "n_eval=30", "steps=1")
    trainer = Trainer(cfg)
    train = {ex.prompt for ex in trainer.train_set}
    assert len(trainer.eval_set) == 30 and not train & {ex.prompt for ex in trainer.eval_set}


def test_n_eval_kl_must_be_a_non_negative_int(tmp_path):
    with pytest.raises(config_mod.ConfigError, match="n_eval_kl"):
        learning_cfg(tmp_path, "n_eval_kl=-1")
