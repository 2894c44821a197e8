"""`gopd experiment reward-correction`: strong-to-weak ExOPD with and without reward correction.

The teachers are domain experts made from the full model (a short SFT on their domain's training
questions, as in the merge setting); the student is weaker but shares the tokenizer: the full model with
a block of decoder layers removed and briefly healed to imitate it (gopd.experiments.truncated). The
student is distilled from the experts with routing at lam = ``experiment.lam`` (ExOPD), in two arms that
differ only in the reference pi_r of the target pi_t^lam * pi_r^(1 - lam):

    student-ref    pi_r = the student's initial weights (what lam-sweep uses);
    corrected      pi_r = the experts' pre-SFT base, the full model (reward correction: the reward
                   lam * log(pi_t / pi_r) then measures what the experts' training added, not the
                   capacity gap between the two model sizes).

Reported per domain, with the statistics of gopd.experiments.arms: pass@1 of the initial student, the
experts and each arm (seed-averaged per question, 95% intervals), the paired 95% interval of corrected -
student-ref, the curves, and the minimum detectable difference at the measured rates. Writes
reward_correction_<cpu|gpu>.json and .png.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

import torch

from .. import config as config_mod
from .. import data as data_mod
from .arms import Arm, run_arms
from .runner import finish, main_for, schedule
from .truncated import build
from .truncated import load as load_truncated

RC_YAML = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "reward_correction_s2w.yaml")
DEFAULTS = dict(lam=1.25, truncate=None, curve_every=0, n_curve=32, n_curve_kl=8, eval_batch_size=32,
                score_base=True, score_teachers=True,
                student_cache="runs/students")
GPU_OVERRIDES = ("device=cuda", "threads=0", "n_train=1024", "n_eval=2048", "steps=40", "batch_size=32",
                 "micro_batch_size=32", "experiment.curve_every=5", "experiment.n_curve=128",
                 "experiment.n_curve_kl=32", "experiment.eval_batch_size=256")
BASELINE, CORRECTED = "student-ref", "corrected"


def arms(lam: float, student_spec, base_spec) -> list:
    """The two arms: reference = the student's initial weights (the baseline) and = the experts' base."""
    return [Arm(BASELINE, {"lam": lam, "reference": student_spec}),
            Arm(CORRECTED, {"lam": lam, "reference": base_spec})]


def prepare_student(cfg: config_mod.Config, block: dict) -> str:
    """The path of the truncated, healed student (built once, cached in experiment.student_cache); the
    heal prompts are the run's training questions (the trainer draws them from the same seed)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    base_spec = next(s["sft"] for s in cfg.teachers.values() if isinstance(s, dict) and "sft" in s)
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    train = data_mod.load(cfg.train_data, n=cfg.n_train, digits=cfg.synthetic_digits, ops=cfg.synthetic_ops,
                          seed=data_seed)
    return build(base_spec, block["truncate"], train, block["student_cache"], cfg.max_new_tokens, cfg.device)


def run(cfg: config_mod.Config, block: dict, seeds: Sequence[int], out_dir: str, tag: str, cmd: str) -> dict:
    t0 = time.perf_counter()
    if not block.get("truncate"):
        raise config_mod.ConfigError("experiment.truncate is required: which layers of the full model to remove")
    lam = block["lam"]
    if not isinstance(lam, (int, float)) or isinstance(lam, bool):
        raise config_mod.ConfigError(f"experiment.lam must be a number, got {lam!r}")
    bases = {repr(s["sft"]) for s in cfg.teachers.values() if isinstance(s, dict) and "sft" in s}
    if len(bases) != 1 or len(cfg.teachers) < 2:
        raise config_mod.ConfigError("reward-correction needs 'teachers' with one sft expert per domain (>= 2), "
                                     "all fine-tuned from the same base (the full model)")
    base_spec = next(s["sft"] for s in cfg.teachers.values())
    t = time.perf_counter()
    student = prepare_student(cfg, block)
    build_s = time.perf_counter() - t
    cfg = dataclasses.replace(cfg, student=student)
    arm_list = arms(float(lam), student, base_spec)
    result = run_arms(cfg, arm_list, seeds, schedule(block), student=load_truncated(student, base_spec, cfg.device),
                      partial_path=os.path.join(out_dir, f"reward_correction_{tag}.partial.json"),
                      meta=dict(command=cmd, experiment=dict(block), config=config_mod.to_dict(cfg)))
    result["wall_s"]["truncated student"] = build_s
    return finish(result, cfg=cfg, block=block, cmd=cmd, arms=arm_list, baseline=BASELINE, out_dir=out_dir,
                  name=f"reward_correction_{tag}", t0=t0, student_path=os.path.basename(student),
                  title=f"strong-to-weak ExOPD (lam={lam:g}): reference = student's initial weights vs "
                        "the experts' base")


main = main_for("reward-correction", RC_YAML, DEFAULTS, GPU_OVERRIDES, run)
