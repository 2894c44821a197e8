"""`gopd experiment lam-sweep`: ExOPD against OPD in the merge setting, with the power to tell them apart.

The setting of `gopd experiment merge` (two domain experts, each a short SFT of the student on its own
domain's training questions, distilled back into the student from its initial weights with routing and
those initial weights as the reference pi_r), run for each lam of ``experiment.lams`` (lam = 1 is OPD,
lam > 1 ExOPD) and each sampling seed, on domains where neither the student nor the experts are at
the ceiling, with enough held-out questions per domain for the paired test (gopd.experiments.arms).

Reported per domain and lam: pass@1 (seed-averaged per question) with its 95% interval, the paired 95%
interval of lam - (lam = 1), the learning curves (pass@1 on the curve questions, and KL(student ||
teacher) on the training rollouts at every step and on held-out questions at the curve points), and the
minimum detectable difference of the design at the measured rates. Writes lam_sweep_<cpu|gpu>.json
(everything, the command and the wall times) and .png.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from .. import config as config_mod
from .arms import Arm, run_arms
from .runner import finish, main_for, optional_float_list, schedule

LAM_SWEEP_YAML = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "lam_sweep.yaml")
DEFAULTS = dict(lams=[1.0, 1.25, 1.5], curve_every=0, n_curve=32, n_curve_kl=8, eval_batch_size=32,
                score_base=True, score_teachers=True)
# The larger run of one CUDA GPU: more held-out questions and steps, the GPU's batch.
GPU_OVERRIDES = ("device=cuda", "threads=0", "n_train=1024", "n_eval=2048", "steps=40", "batch_size=32",
                 "micro_batch_size=32", "experiment.curve_every=5", "experiment.n_curve=128",
                 "experiment.n_curve_kl=32", "experiment.eval_batch_size=256")


def lam_arms(lams: Sequence[float]) -> list:
    """One arm per lam, named "lam=<lam>"; the first is the baseline of the paired differences."""
    if len(set(lams)) != len(lams):
        raise config_mod.ConfigError(f"experiment.lams must be distinct, got {list(lams)}")
    return [Arm(f"lam={lam:g}", {"lam": float(lam)}) for lam in lams]


def run(cfg, block: dict, seeds: Sequence[int], out_dir: str, tag: str, cmd: str) -> dict:
    t0 = time.perf_counter()
    lams = block["lams"] if block["lams"] == [] else optional_float_list(block, "lams")
    # lam = 1 (OPD) is the baseline of the paired differences; a part of a run split over processes
    # (combine) may hold one other lam alone, or none (it scores the base student and the teachers only).
    if 1.0 not in lams and len(lams) > 1:
        raise config_mod.ConfigError(f"experiment.lams must include 1.0 (OPD, the baseline), got {lams}")
    lams = sorted(lams, key=lambda x: x != 1.0)
    arms = lam_arms(lams)
    sched = schedule(block)
    result = run_arms(cfg, arms, seeds, sched, partial_path=os.path.join(out_dir, f"lam_sweep_{tag}.partial.json"),
                      meta=dict(command=cmd, experiment=dict(block), config=config_mod.to_dict(cfg)))
    baseline = arms[0].name if arms else None
    return finish(result, cfg=cfg, block=block, cmd=cmd, arms=arms, baseline=baseline, out_dir=out_dir,
                  name=f"lam_sweep_{tag}", title="lam sweep in the merge setting: OPD (lam=1) vs ExOPD", t0=t0,
                  lams=lams)


main = main_for("lam-sweep", LAM_SWEEP_YAML, DEFAULTS, GPU_OVERRIDES, run)
