"""`gopd demo`: OPD (lam = 1) vs ExOPD (lam = 1.25) on SmolLM2-135M-Instruct, from the same start.

The teacher is the student's own initial weights given the solution in its prompt (on-policy context
distillation): it shares the tokenizer and is better on the task by construction. Both arms start from
the same weights, see the same prompt batches and the same sampling seeds; only lam differs. Prints a
table (accuracy and wall time of: student before, teacher, after OPD, after ExOPD) and writes
demo.png + demo.json in the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

from . import config as config_mod
from .models import load_model
from .trainer import Trainer

DEMO_YAML = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.yaml")


def default_config() -> config_mod.Config:
    if os.path.exists(DEMO_YAML):
        return config_mod.load(DEMO_YAML)
    return config_mod.from_dict(dict(student="smollm2", teacher_context="solution", lam=1.25, n_train=512,
                                     n_eval=32, max_new_tokens=12, eval_max_new_tokens=12, steps=8,
                                     batch_size=8, micro_batch_size=8, lr=1e-5, out_dir="runs/demo", threads=2))


def run_demo(cfg: config_mod.Config = None) -> dict:
    cfg = cfg or default_config()
    t0 = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model, tok = load_model(cfg.student, cfg.device)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t_load = time.perf_counter() - t0
    results, curves = {}, {}
    for arm, lam in (("OPD", 1.0), ("ExOPD", cfg.lam if cfg.lam != 1.0 else 1.25)):
        model.load_state_dict(initial)
        first = not results
        arm_cfg = dataclasses.replace(cfg, lam=lam, out_dir=os.path.join(cfg.out_dir, arm.lower()),
                                      eval_at_start=False, eval_teachers=False, save_final_model=False,
                                      # the initial student as pi_r in both arms: it cancels at lam = 1 but
                                      # makes the reward / kl curves comparable
                                      reference=cfg.student)
        trainer = Trainer(arm_cfg, student=(model, tok))
        if first:
            t = time.perf_counter()
            results["student before"] = (trainer.evaluate_student(), time.perf_counter() - t)
            t = time.perf_counter()
            teacher = trainer.evaluate_teachers()
            results["teacher (solution in prompt)"] = (sum(teacher.values()) / len(teacher), time.perf_counter() - t)
        t = time.perf_counter()
        rows = trainer.train()
        results[f"after {arm} (lam={lam:g})"] = (rows[-1]["accuracy"], time.perf_counter() - t)
        curves[arm] = rows
    total = time.perf_counter() - t0

    lines = [f"G-OPD demo: {cfg.student}, {cfg.synthetic_digits}-digit {'/'.join(cfg.synthetic_ops)}, "
             f"{cfg.steps} steps x {cfg.batch_size} rollouts, n_eval={cfg.n_eval}, load {t_load:.0f}s",
             f"{'model':34s} {'accuracy':>9s} {'wall s':>8s}"]
    lines += [f"{name:34s} {acc:9.3f} {sec:8.1f}" for name, (acc, sec) in results.items()]
    lines.append(f"total wall time {total:.0f}s")
    print("\n".join(lines))
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "demo.json"), "w") as fh:
        json.dump(dict(results={k: dict(accuracy=a, wall_s=s) for k, (a, s) in results.items()},
                       total_s=total, curves=curves), fh, indent=1)
    _plot(curves, results, os.path.join(cfg.out_dir, "demo.png"))
    return results


def _plot(curves, results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for arm, rows in curves.items():
        steps = [r for r in rows if "loss" in r]
        axes[0].plot([r["step"] for r in steps], [r["reward"] for r in steps], marker=".", label=arm)
        axes[1].plot([r["step"] for r in steps], [r["lp_s"] for r in steps], marker=".", label=arm)
    axes[0].set_title("reward per token")
    axes[1].set_title("student log-prob of its samples")
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
