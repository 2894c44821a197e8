"""`gopd experiment lam-sweep` and `gopd experiment reward-correction` end to end on tiny models: experts
built, every (arm, seed) trained with its curve, per-domain table with intervals, paired differences to
the baseline arm, power figures, JSON + PNG written (the science runs on SmolLM2, see docs/science.md;
this checks the pipeline and its bookkeeping)."""

import json

import pytest
import yaml

from gopd.cli import main

STUDENT = {"tiny": {"initializer_range": 0.2}, "seed": 0}
BASE = {"tiny": {"initializer_range": 0.2, "num_hidden_layers": 3}, "seed": 1}


def _config(tmp_path, student, base, **extra):
    expert = dict(sft=base, steps=2, lr=3.0e-3)
    return dict(student=student, teachers={"add": dict(expert, ops=["add"]), "mul": dict(expert, ops=["mul"])},
                reference=student, mode="full", synthetic_ops=["add", "mul"], synthetic_digits=1, n_train=8,
                n_eval=6, data_seed=0, verifier="strict", max_new_tokens=3, eval_max_new_tokens=3, steps=2,
                batch_size=4, micro_batch_size=4, lr=1.0e-3, out_dir=str(tmp_path / "runs"),
                expert_cache=str(tmp_path / "experts"), threads=1, progress=False, **extra)


def _check_common(result, arms, baseline, seeds, n_questions, steps):
    assert result["seeds"] == seeds and [a["name"] for a in result["arms"]] == arms
    for dom, block in result["domains"].items():
        models = block["models"]
        assert set(arms) <= set(models) and "base student" in models and f"teacher[{dom}]" in models
        for arm in arms:
            assert models[arm]["n_questions"] == n_questions and len(models[arm]["per_seed"]) == len(seeds)
            # seed-averaged per question: the arm's pass@1 is the mean of its per-seed rates
            assert models[arm]["accuracy"] == pytest.approx(sum(models[arm]["per_seed"]) / len(seeds))
        assert set(block["comparisons"]) == {f"{a} - {baseline}" for a in arms if a != baseline}
        for c in block["comparisons"].values():
            assert c["ci95"][0] <= c["diff"] <= c["ci95"][1]
        assert result["power"][dom]["mdd_bound"] >= 0 and result["power"][dom]["n_questions"] == n_questions
        assert not any(f"teacher[{d}]" in models for d in result["domains"] if d != dom)  # own domain only
    for name, curve in result["curves"].items():
        assert [p["step"] for p in curve] == [0, 1, 2]            # curve_every 1: every step
        assert all(set(p["kl_to_teacher"]) == {"add", "mul"} for p in curve)
    assert all(len(rows) == steps for rows in result["steps"].values())
    assert len(result["curves"]) == len(arms) * len(seeds)


def test_lam_sweep_runs_end_to_end(tmp_path):
    cfg = _config(tmp_path, STUDENT, STUDENT,
                  experiment=dict(lams=[1.0, 1.5], curve_every=1, n_curve=2, n_curve_kl=2, eval_batch_size=4))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["experiment", "lam-sweep", "--config", str(tmp_path / "tiny.yaml"), "--seeds", "0", "1",
            "--out", str(tmp_path / "results"), "--set", "experiment.n_curve=3"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "results" / "lam_sweep_cpu.json").read_text())
    assert (tmp_path / "results" / "lam_sweep_cpu.png").stat().st_size > 0
    assert result["command"] == "gopd experiment lam-sweep " + " ".join(argv[2:])
    assert result["experiment"]["n_curve"] == 3 and result["lams"] == [1.0, 1.5]
    _check_common(result, ["lam=1", "lam=1.5"], "lam=1", [0, 1], 3, 2)
    assert {r["lam"] for r in result["arms"]} == {1.0, 1.5}


def test_reward_correction_runs_end_to_end(tmp_path):
    cfg = _config(tmp_path, None, BASE, experiment=dict(
        lam=1.25, truncate=dict(drop=[1, 2], heal_steps=2, heal_lr=1e-3, heal_batch_size=4),
        curve_every=1, n_curve=2, n_curve_kl=2, eval_batch_size=4, student_cache=str(tmp_path / "students")))
    del cfg["student"], cfg["reference"]
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["experiment", "reward-correction", "--config", str(tmp_path / "tiny.yaml"), "--seeds", "0", "1",
            "--out", str(tmp_path / "results")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "results" / "reward_correction_cpu.json").read_text())
    assert (tmp_path / "results" / "reward_correction_cpu.png").stat().st_size > 0
    _check_common(result, ["student-ref", "corrected"], "student-ref", [0, 1], 3, 2)
    students = list((tmp_path / "students").glob("truncated-*"))
    assert len(students) == 1
    saved = json.loads((students[0] / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2                       # 3 layers, the middle one removed
    refs = {a["name"]: a["reference"] for a in result["arms"]}
    assert refs["corrected"] == BASE and refs["student-ref"] == str(students[0])
    assert main(argv) == 0                                       # the second run reuses the cached student
    assert list((tmp_path / "students").glob("truncated-*")) == students


def test_experiment_block_rejects_unknown_keys(tmp_path, capsys):
    cfg = _config(tmp_path, STUDENT, STUDENT, experiment=dict(lamz=[1.0]))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["experiment", "lam-sweep", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "lamz" in capsys.readouterr().err


def test_parts_in_separate_processes_combine_into_one_run(tmp_path):
    """One lam per part (the base student and teachers scored by the first only), joined by combine: the
    result equals a run of both arms in one process, question by question."""
    from gopd.experiments.combine import main as combine_main

    cfg = _config(tmp_path, STUDENT, STUDENT, experiment=dict(curve_every=1, n_curve=2, n_curve_kl=2,
                                                              eval_batch_size=4))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    base = ["experiment", "lam-sweep", "--config", str(tmp_path / "tiny.yaml"), "--seeds", "0", "1"]
    assert main(base + ["--out", str(tmp_path / "a"), "--set", "experiment.lams=[1.0]",
                        "--set", "experiment.score_teachers=false"]) == 0
    assert main(base + ["--out", str(tmp_path / "s"), "--set", "experiment.lams=[]",   # the teachers only
                        "--set", "experiment.score_base=false"]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--set", "experiment.lams=[1.5]",
                        "--set", "experiment.score_base=false",
                        "--set", "experiment.score_teachers=false"]) == 0
    b = json.loads((tmp_path / "b" / "lam_sweep_cpu.json").read_text())
    assert "base student" not in b["outcomes"]
    out = tmp_path / "joined" / "lam_sweep_cpu"
    s_part = json.loads((tmp_path / "s" / "lam_sweep_cpu.json").read_text())
    assert sorted(s_part["outcomes"]) == ["teacher[add]", "teacher[mul]"] and s_part["curves"] == {}
    assert combine_main(["--kind", "lam-sweep", "--baseline", "lam=1", "--out", str(out),
                         str(tmp_path / "a" / "lam_sweep_cpu.json"), str(tmp_path / "b" / "lam_sweep_cpu.json"),
                         str(tmp_path / "s" / "lam_sweep_cpu.json")]) == 0
    joined = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    _check_common(joined, ["lam=1", "lam=1.5"], "lam=1", [0, 1], 3, 2)
    assert b["domains"]["add"]["comparisons"] == {}                # one lam alone: nothing to compare
    a = json.loads((tmp_path / "a" / "lam_sweep_cpu.json").read_text())
    for dom in ("add", "mul"):  # the joined difference, recomputed from the two parts' outcomes
        d = [sum(b["outcomes"][f"lam=1.5 seed={s}"][dom][q] - a["outcomes"][f"lam=1 seed={s}"][dom][q]
                 for s in (0, 1)) / 2 for q in range(3)]
        assert joined["domains"][dom]["comparisons"]["lam=1.5 - lam=1"]["diff"] == pytest.approx(sum(d) / 3)
    # a part stopped early: its .partial.json holds the finished seeds, and --seeds joins only those
    partial = json.loads((tmp_path / "b" / "lam_sweep_cpu.partial.json").read_text())
    assert partial["seeds"] == [0, 1] and partial["command"].startswith("gopd experiment lam-sweep")
    assert combine_main([str(tmp_path / "a" / "lam_sweep_cpu.json"), str(tmp_path / "b" / "lam_sweep_cpu.partial.json"),
                         "--kind", "lam-sweep", "--baseline", "lam=1", "--out", str(out) + "_s0", "--seeds", "0"]) == 0
    first = json.loads((tmp_path / "joined" / "lam_sweep_cpu_s0.json").read_text())
    assert first["seeds"] == [0] and sorted(first["curves"]) == ["lam=1 seed=0", "lam=1.5 seed=0"]
    assert len(joined["commands"]) == 3 and {"base student", "teacher[add]"} <= set(joined["outcomes"])
