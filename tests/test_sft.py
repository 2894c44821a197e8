"""SFT experts (gopd.sft): a teacher spec {"sft": base, ...} fine-tunes a copy of the base on the run's
training questions, answered by their worked solutions; built once, then loaded from the cache."""

import pytest
import torch

from gopd import config as config_mod
from gopd import sft
from gopd.trainer import Trainer

STUDENT = "{tiny: {initializer_range: 0.2}, seed: 0}"


def sft_cfg(tmp_path, *overrides):
    return config_mod.load(None, (
        f"out_dir={tmp_path / 'run'}", f"expert_cache={tmp_path / 'experts'}", f"student={STUDENT}",
        "synthetic_digits=1", "n_train=16", "n_eval=8", "steps=1", "eval_at_start=false", "eval_teachers=false",
        "save_final_model=false", "progress=false", "threads=1") + overrides)


def mean_sft_loss(model, trainer, examples):
    pairs = [(trainer.codec.prompt_ids(ex), sft.target_ids(trainer.codec, ex)) for ex in examples]
    with torch.no_grad():
        return float(sft.sft_loss(model, trainer.codec, pairs))


def test_expert_learns_its_solutions_and_is_built_once(tmp_path, monkeypatch):
    teacher = f"teacher={{sft: {STUDENT}, steps: 40, lr: 3.0e-3, batch_size: 8}}"
    trainer = Trainer(sft_cfg(tmp_path, teacher))
    expert = trainer.default_teacher
    base, tuned = mean_sft_loss(trainer.student, trainer, trainer.train_set), mean_sft_loss(expert, trainer,
                                                                                            trainer.train_set)
    # The base is a random tiny model (~ log V per token); the expert has fitted "a + b = c<eos>".
    assert tuned < 0.5 * base, (base, tuned)
    assert not any(p.requires_grad for p in expert.parameters())
    assert trainer.train_set[0].solution and trainer.train_set[0].solution.endswith(trainer.train_set[0].answer)
    cached = list((tmp_path / "experts").glob("sft-*.pt"))
    assert len(cached) == 1

    # Same spec and data: loaded, not trained again, the same weights.
    monkeypatch.setattr(sft, "train", lambda *a, **k: pytest.fail("the cached expert was trained again"))
    again = Trainer(sft_cfg(tmp_path, teacher)).default_teacher
    for a, b in zip(expert.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # Other training questions: another expert (a different cache key).
    monkeypatch.undo()
    Trainer(sft_cfg(tmp_path, teacher.replace("steps: 40", "steps: 2"), "n_train=12"))
    assert len(list((tmp_path / "experts").glob("sft-*.pt"))) == 2


def test_expert_of_one_domain_sees_only_that_domain(tmp_path, monkeypatch):
    seen = []

    def spy(model, codec, pairs, **kw):
        seen.extend(codec.decode(t) for _, t in pairs)
        return [0.0]

    monkeypatch.setattr(sft, "train", spy)
    Trainer(sft_cfg(tmp_path, "synthetic_ops=[add, mul]", f"teachers={{add: {{sft: {STUDENT}, ops: [add]}}, "
                              f"mul: {{sft: {STUDENT}, ops: [mul]}}}}"))
    assert seen and all(("+" in s) != ("*" in s) for s in seen)
    assert sum("+" in s for s in seen) == sum("*" in s for s in seen) == 8


@pytest.mark.parametrize("override,word", [
    ("teacher={sft: smollm2, stepz: 3}", "stepz"),
    ("teacher={sft: smollm2, steps: 0}", "steps"),
    ("teacher={sft: smollm2, lr: -1}", "lr"),
    ("teachers={add: {sft: smollm2, ops: []}}", "ops"),
    ("reference={sft: smollm2}", "reference"),
])
def test_bad_sft_spec_is_a_clear_error(tmp_path, override, word):
    with pytest.raises(config_mod.ConfigError, match=word):
        sft_cfg(tmp_path, override)
