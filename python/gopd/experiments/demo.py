"""`gopd demo`: OPD (lam = 1) vs ExOPD (lam = 1.25) on SmolLM2-135M-Instruct, from the same start.

The teacher is a domain expert made from the student's own weights by a short SFT on the training
questions (gopd.sft, cached): it shares the tokenizer and is measurably better on the task (README, the
demo's table).
Both arms start from the same weights, see the same prompt batches and the same sampling seeds; only
lam differs. Prints a table (pass@1 on the held-out questions with a 95% Wilson interval and wall time
of: student before, teacher, after OPD, after ExOPD; then each one's difference to the student before
with its paired 95% interval, the models being scored on the same questions) and writes demo.png
(held-out pass@1 and KL(student || teacher) over the steps, and the final bars) + demo.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

import torch

from .. import config as config_mod
from ..models import load_model
from ..progress import note, phase
from ..trainer import Trainer
from .stats import paired_difference, wilson_interval

# configs/demo.yaml in a source checkout; an installed package has no configs/ folder and uses
# DEMO_DEFAULTS, which must equal that file (tests/test_demo_cli.py checks it).
DEMO_YAML = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "demo.yaml")
DEMO_DEFAULTS = dict(student="smollm2", teacher=dict(sft="smollm2", steps=30, lr=5.0e-5), teacher_context="none",
                     expert_cache="runs/experts", reference=None, lam=1.25,
                     mode="full", train_data="synthetic", eval_data="synthetic", synthetic_ops=["add"],
                     synthetic_digits=1, n_train=32, n_eval=48, verifier="strict", max_new_tokens=8,
                     eval_max_new_tokens=12, n_eval_kl=16, steps=8, batch_size=8, micro_batch_size=8, lr=3.0e-5,
                     grad_clip=1.0, eval_every=4, out_dir="runs/demo", threads=2)


def demo_config(path: Optional[str] = None, overrides: tuple = ()) -> config_mod.Config:
    """The demo's config: `path` if given, else configs/demo.yaml when it exists (source checkout),
    else DEMO_DEFAULTS (installed package); then the ``key=value`` overrides, in every case."""
    if path is None and os.path.exists(DEMO_YAML):
        path = DEMO_YAML
    return config_mod.load(path, overrides, base=None if path else DEMO_DEFAULTS)


def run_demo(cfg: config_mod.Config = None) -> dict:
    cfg = cfg or demo_config()
    t0 = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    # The outer phase: its heartbeat lines show the demo is alive while a model loads or an expert builds.
    with phase("demo", total=2) as arms:
        model, tok = load_model(cfg.student, cfg.device)
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        t_load = time.perf_counter() - t0
        results, curves, outcomes = {}, {}, {}
        teacher_name = teacher_label(cfg)
        for arm, lam in (("OPD", 1.0), ("ExOPD", cfg.lam if cfg.lam != 1.0 else 1.25)):
            model.load_state_dict(initial)
            first = not results
            arm_cfg = dataclasses.replace(cfg, lam=lam, out_dir=os.path.join(cfg.out_dir, arm.lower()),
                                          eval_at_start=False, eval_teachers=False, save_final_model=False,
                                          # the initial student as pi_r in both arms: it cancels at lam = 1 but
                                          # makes the reward / kl curves comparable
                                          reference=cfg.student)
            t = time.perf_counter()
            trainer = Trainer(arm_cfg, student=(model, tok))  # the first one builds the SFT expert (or loads it)
            if first:
                t_teacher = time.perf_counter() - t
                # Both arms start from the same weights: step 0 is measured once and starts both curves.
                t = time.perf_counter()
                start = dict(step=0, **trainer.evaluation())
                results["student before"] = (start["accuracy"], time.perf_counter() - t)
                note(f"student before: pass@1 {start['accuracy']:.3f}, KL to teacher {start.get('kl_to_teacher')}")
                outcomes["student before"] = _flat(trainer.last_outcomes)
                t = time.perf_counter()
                per_dom = {}
                teacher = trainer.evaluate_teachers(outcomes=per_dom)
                results[teacher_name] = (sum(teacher.values()) / len(teacher), time.perf_counter() - t)
                outcomes[teacher_name] = _flat(per_dom)
                note(f"{teacher_name}: pass@1 {results[teacher_name][0]:.3f}")
            t = time.perf_counter()
            rows = trainer.train()
            name = f"after {arm} (lam={lam:g})"
            results[name] = (rows[-1]["accuracy"], time.perf_counter() - t)
            outcomes[name] = _flat(trainer.last_outcomes)
            note(f"{name}: pass@1 {results[name][0]:.3f} ({results[name][1]:.0f}s)")
            curves[arm] = [start] + rows
            arms.advance()
    total = time.perf_counter() - t0

    n = len(outcomes["student before"])
    lines = [f"G-OPD demo: {cfg.student}, {cfg.synthetic_digits}-digit {'/'.join(cfg.synthetic_ops)}, "
             f"{cfg.verifier} verifier, {cfg.steps} steps x {cfg.batch_size} rollouts, mode={cfg.mode}, "
             f"lr={cfg.lr:g}, {n} held-out questions, load {t_load:.0f}s, teacher made / loaded {t_teacher:.0f}s",
             f"{'model':34s} {'pass@1':>7s} {'95% CI':>13s} {'wall s':>8s}"]
    for name, (acc, sec) in results.items():
        lo, hi = wilson_interval(acc, n)
        lines.append(f"{name:34s} {acc:7.3f} {f'[{lo:.2f}, {hi:.2f}]':>13s} {sec:8.1f}")
    base = outcomes["student before"]
    diffs = {}
    for name in list(results)[1:]:
        d, half = paired_difference(outcomes[name], base)
        diffs[name] = dict(diff=d, half_width=half)
        verdict = "better" if d - half > 0 else "worse" if d + half < 0 else "no significant change"
        lines.append(f"{name} - student before: {d:+.3f} +- {half:.3f} (95%, paired): {verdict}")
    lines.append(f"total wall time {total:.0f}s")
    print("\n".join(lines))
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "demo.json"), "w") as fh:
        json.dump(dict(results={k: dict(accuracy=a, wall_s=s, ci95=wilson_interval(a, n))
                                for k, (a, s) in results.items()},
                       differences_to_student_before=diffs, n_eval=n, total_s=total, load_s=t_load,
                       teacher_build_s=t_teacher,
                       config=config_mod.to_dict(cfg), curves=curves, table="\n".join(lines)), fh, indent=1)
    _plot(curves, results, os.path.join(cfg.out_dir, "demo.png"))
    return results


def teacher_label(cfg) -> str:
    """The teacher's row in the demo's table: what makes it a better model than the student."""
    if isinstance(cfg.teacher, dict) and "sft" in cfg.teacher:
        return f"teacher (SFT expert, {cfg.teacher.get('steps', '?')} steps)"
    if cfg.teacher_context != "none":
        return f"teacher ({cfg.teacher_context} in prompt)"
    return "teacher"


def _flat(per_domain: dict) -> list:
    return [x for dom in sorted(per_domain) for x in per_domain[dom]]


def _plot(curves, results, path):
    """Held-out pass@1 and KL(student || teacher) over the steps of each arm, and the final bars."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    for arm, rows in curves.items():
        for ax, key in ((axes[0], "accuracy"), (axes[1], "kl_to_teacher")):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=arm)
    axes[0].set_title("held-out pass@1 of the student")
    axes[1].set_title("KL(student || teacher) per token, held-out")
    names = list(results)
    axes[2].bar(range(len(names)), [results[n][0] for n in names])
    axes[2].set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
    axes[2].set_title("pass@1")
    for ax in axes[:2]:
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
