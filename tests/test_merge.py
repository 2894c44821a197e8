"""`gopd experiment merge` end to end on tiny models: experts built, routed distillation for both lams and
each seed, per-domain table with intervals and verdicts, JSON + PNG written (the science runs on SmolLM2,
see the README; this checks the pipeline and its bookkeeping)."""

import json

import yaml

from gopd.cli import main

STUDENT = {"tiny": {"initializer_range": 0.2}, "seed": 0}


def test_merge_experiment_runs_end_to_end(tmp_path):
    expert = dict(sft=STUDENT, steps=3, lr=3.0e-3)
    cfg = dict(student=STUDENT, teachers={"add": dict(expert, ops=["add"]), "mul": dict(expert, ops=["mul"])},
               reference=STUDENT, mode="full", synthetic_ops=["add", "mul"], synthetic_digits=1, n_train=8,
               n_eval=8, data_seed=0, verifier="strict", max_new_tokens=3, eval_max_new_tokens=3, steps=1,
               batch_size=4, micro_batch_size=4, lr=1.0e-3, out_dir=str(tmp_path / "runs"),
               expert_cache=str(tmp_path / "experts"), threads=1, progress=False)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["experiment", "merge", "--config", str(tmp_path / "tiny.yaml"), "--seeds", "0", "1",
            "--out", str(tmp_path / "results")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "results" / "merge_cpu.json").read_text())
    assert (tmp_path / "results" / "merge_cpu.png").stat().st_size > 0
    assert result["command"].startswith("gopd experiment merge --config") and result["seeds"] == [0, 1]
    assert sorted(result["domains"]) == ["add", "mul"]
    for dom, block in result["domains"].items():
        models = block["models"]
        assert set(models) == {"base student", "expert[add]", "expert[mul]", "merged OPD (lam=1)",
                               "merged ExOPD (lam=1.25)"}
        # 4 held-out questions per domain; the merged arms average each question over the 2 seeds
        assert models["base student"]["n_questions"] == models["merged OPD (lam=1)"]["n_questions"] == 4
        assert len(models["merged ExOPD (lam=1.25)"]["per_seed"]) == 2
        assert set(block["comparisons"]) == {f"merged OPD (lam=1) - expert[{dom}]",
                                             f"merged ExOPD (lam=1.25) - expert[{dom}]", "ExOPD - OPD"}
    assert len(list((tmp_path / "experts").glob("sft-*.pt"))) == 2  # one per domain, built once
