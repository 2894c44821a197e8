"""The experiments' statistics against values computed by hand, and the rollout KL-to-teacher identity
against an independent scoring of the same responses."""

import math

import pytest

from gopd.config import Config
from gopd.experiments.arms import rollout_kl_to_teacher, seed_averaged, summarize
from gopd.experiments.stats import min_detectable_difference, paired_difference, seed_within_variance, wilson_interval
from gopd.metrics import reverse_kl, token_logprobs
from gopd.trainer import Trainer


def test_paired_difference_by_hand():
    # d = [1, 0, 0, -1]: mean 0, sample variance 2/3, half width 1.96 sqrt(2/3 / 4)
    d, half = paired_difference([1, 1, 0, 0], [0, 1, 0, 1])
    assert d == 0.0 and half == pytest.approx(1.96 * math.sqrt(2 / 3 / 4))
    d, half = paired_difference([1, 1, 1, 0], [0, 1, 1, 0])   # d = [1, 0, 0, 0]: mean 1/4, var 1/4
    assert d == 0.25 and half == pytest.approx(1.96 * math.sqrt(0.25 / 4))


def test_wilson_interval_by_hand():
    lo, hi = wilson_interval(0.5, 10)        # 5 / 10: the textbook [0.2366, 0.7634]
    assert (lo, hi) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    lo, hi = wilson_interval(0.0, 20)        # 0 / 20: [0, z^2 / (n + z^2)]
    assert lo == 0.0 and hi == pytest.approx(1.96 ** 2 / (20 + 1.96 ** 2))


def test_min_detectable_difference_by_hand():
    # (z_0.975 + z_0.8) sqrt(2 * 0.25 / 3 / 200) = 2.801585 * 0.0288675
    assert min_detectable_difference(0.5, 200, 3) == pytest.approx(0.080875, abs=1e-6)
    # a measured within-question variance replaces p (1 - p)
    assert min_detectable_difference(0.5, 200, 3, within=0.1) == pytest.approx(
        2.801585 * math.sqrt(0.2 / 600), abs=1e-6)
    # power 0.5: only z_0.975 remains; 4x the questions halve it
    assert min_detectable_difference(0.3, 100, 1, power=0.5) == pytest.approx(1.959964 * math.sqrt(0.42 / 100),
                                                                              abs=1e-6)
    assert min_detectable_difference(0.3, 400, 2) == pytest.approx(min_detectable_difference(0.3, 100, 2) / 2)
    with pytest.raises(ValueError, match="seeds"):
        min_detectable_difference(0.5, 10, 0)


def test_seed_within_variance_by_hand():
    # two seeds: half the fraction of questions on which they disagree (2 of 4)
    assert seed_within_variance([[1, 0, 1, 0], [1, 1, 0, 0]]) == pytest.approx(0.25)
    # three seeds: m (k - m) / (k (k - 1)) per question = 1/3, 1/3, 0
    assert seed_within_variance([[1, 1, 0], [1, 0, 0], [0, 1, 0]]) == pytest.approx(2 / 9)
    with pytest.raises(ValueError):
        seed_within_variance([[1, 0]])


def test_summarize_by_hand():
    # two arms x two seeds on 4 questions of one domain; B = A on seed 0, one more question right on seed 1
    outcomes = {"base student": {"x": [0, 0, 0, 0]},
                "A seed=0": {"x": [1, 0, 0, 1]}, "A seed=1": {"x": [1, 1, 0, 0]},
                "B seed=0": {"x": [1, 0, 0, 1]}, "B seed=1": {"x": [1, 1, 1, 0]}}
    assert seed_averaged(outcomes, ["A seed=0", "A seed=1"], "x") == [1.0, 0.5, 0.0, 0.5]
    run = dict(outcomes=outcomes, seeds=[0, 1], arms=[dict(name="A"), dict(name="B")], domain_names=["x"])
    s = summarize(run, baseline="A")["domains"]["x"]
    assert s["models"]["A"]["accuracy"] == 0.5 and s["models"]["B"]["accuracy"] == 0.625
    assert s["models"]["B"]["per_seed"] == [0.5, 0.75]
    c = s["comparisons"]["B - A"]            # d = [0, 0, 0.5, 0]: mean 1/8, sample var 1/16
    assert c["diff"] == 0.125 and c["half_width"] == pytest.approx(1.96 * math.sqrt(1 / 16 / 4))
    assert c["verdict"] == "no significant difference"
    assert s["models"]["base student"]["ci95"] == pytest.approx(list(wilson_interval(0.0, 4)))


def test_rollout_kl_to_teacher_is_the_kl_of_the_scored_responses(tmp_path):
    """kl - reward / lam from a step's diagnostics (mode full) equals KL(student || teacher) of the step's
    responses scored independently by gopd.metrics (lr = 0: the step does not move the student)."""
    student = {"tiny": {"initializer_range": 0.2}, "seed": 0}
    cfg = Config(student=student, teacher={"tiny": {"initializer_range": 0.2}, "seed": 1},
                 reference={"tiny": {"initializer_range": 0.2}, "seed": 2}, lam=1.5, mode="full",
                 n_train=8, n_eval=2, steps=1, batch_size=4, micro_batch_size=4, max_new_tokens=4, lr=0.0,
                 out_dir=str(tmp_path), save_final_model=False, eval_at_start=False, progress=False, threads=1)
    trainer = Trainer(cfg)
    row = trainer.train_step()
    total, count = 0.0, 0
    for pairs in trainer._last_scored.values():
        prompts, resp = [p for p, _ in pairs], [r for _, r in pairs]
        keep = [i for i, r in enumerate(resp) if r]
        lp_s = token_logprobs(trainer.student, [prompts[i] for i in keep], [resp[i] for i in keep], trainer.codec.pad_id)
        lp_t = token_logprobs(trainer.default_teacher, [prompts[i] for i in keep], [resp[i] for i in keep],
                              trainer.codec.pad_id)
        for a, b in zip(lp_s, lp_t):
            total += float(reverse_kl(a, b).sum())
            count += a.shape[0]
    assert count == row["n_tokens"] > 0
    assert rollout_kl_to_teacher(row, cfg.lam) == pytest.approx(total / count, rel=1e-4, abs=1e-6)
    assert math.isnan(rollout_kl_to_teacher(row, 0.0))
    assert rollout_kl_to_teacher(dict(kl=0.5, reward=0.25), 1.25) == pytest.approx(0.3)


def test_seed_level_difference_by_hand():
    from gopd.experiments.stats import seed_level_difference, t_quantile_975
    # d = [0.1, 0.0, 0.2]: mean 0.1, sd 0.1, half width t_{0.975, 2} 0.1 / sqrt(3) = 4.303 * 0.057735.
    r = seed_level_difference([0.6, 0.5, 0.7], [0.5, 0.5, 0.5])
    assert r["per_seed"] == pytest.approx([0.1, 0.0, 0.2])
    assert r["diff"] == pytest.approx(0.1) and r["half_width"] == pytest.approx(0.248428, abs=1e-5)
    assert r["verdict"] == "no significant difference"
    assert seed_level_difference([0.7, 0.72, 0.69], [0.5, 0.52, 0.5])["verdict"] == "higher"
    assert seed_level_difference([0.5], [0.6])["half_width"] is None
    # Published t_{0.975} values beyond the table: df 11, 20, 30, 100.
    for df, t in ((11, 2.201), (20, 2.086), (30, 2.042), (100, 1.984)):
        assert t_quantile_975(df) == pytest.approx(t, abs=5e-4)
    with pytest.raises(ValueError, match="equally many seeds"):
        seed_level_difference([0.1, 0.2], [0.3])
