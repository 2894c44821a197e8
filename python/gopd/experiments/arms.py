"""Arms x seeds of routed distillation from one student's initial weights, scored question by question.

The machinery shared by `gopd experiment lam-sweep` and `gopd experiment reward-correction`. An arm is a
set of config fields (``lam``, ``reference``); every arm starts from the same initial student, sees the
same training questions (``data_seed``) and the same teachers, and is run once per sampling seed. Scored:

* the final student of each (arm, seed) on every held-out question of every domain (greedy pass@1,
  the config's verifier), kept per question for paired comparisons;
* a learning curve per (arm, seed): every ``curve_every`` steps, pass@1 on the first ``n_curve`` held-out
  questions of each domain and KL(student || own teacher) on the first ``n_curve_kl`` of them
  (gopd.metrics.kl_to_teacher through Trainer.kl_to_teachers); step 0 is measured once (every arm
  starts from the same student and teachers, so it is the same point);
* the base student and each teacher on every held-out question (the teachers with their prompts).

Statistics (gopd.experiments.stats): per domain and arm, pass@1 over the questions with each question's
outcome averaged over the seeds first (the question is the unit; the seeds re-sample the same questions)
and its 95% interval; paired differences of each arm to the baseline arm, question by question.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from typing import Dict, List, Optional, Sequence

import torch

from .. import config as config_mod
from ..eval import evaluate
from ..models import load_model
from ..progress import note
from ..trainer import Trainer, TrainingStopped
from .stats import paired_difference, seed_level_difference, wilson_interval


@dataclasses.dataclass(frozen=True)
class Arm:
    """One treatment: `name` (as reported) and the config fields it sets, e.g. {"lam": 1.25}."""
    name: str
    overrides: dict


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How the arms are measured: the curve points and the evaluation batch (the run's cost drivers)."""
    curve_every: int = 0          # 0: no intermediate curve points (step 0 and the last step only)
    n_curve: int = 32             # held-out questions per domain for the accuracy curve
    n_curve_kl: int = 8           # held-out questions per domain for the KL-to-teacher curve
    eval_batch_size: int = 32     # prompts per greedy generation batch
    score_base: bool = True       # score the base student on the whole held-out set
    score_teachers: bool = True   # score each teacher on its own domain's held-out set
                                  # (a run split over processes scores each in one part only)


def score(model, trainer: Trainer, n: Optional[int] = None, prompt_fn=None, batch_size: int = 32,
          label: str = "", domains: Optional[Sequence[str]] = None) -> Dict[str, List[bool]]:
    """Per domain (all, or `domains`), the greedy pass@1 outcome of `model` on each of the first `n`
    (all: None) held-out questions of that domain, in eval-set order."""
    out = {}
    for dom in domains or trainer.eval_domains():
        subset = [ex for ex in trainer.eval_set if ex.domain == dom][:n]
        kept: list = []
        evaluate(model, trainer.codec, trainer.engine, subset, max_new_tokens=trainer.cfg.eval_max_new_tokens,
                 verifier=trainer.cfg.verifier, prompt_fn=prompt_fn, outcomes=kept, batch_size=batch_size,
                 desc=f"eval {label} {dom}")
        out[dom] = kept
    return out


def curve_point(trainer: Trainer, step: int, sched: Schedule, outcomes: Optional[dict] = None) -> dict:
    """accuracy (per domain, on the first n_curve questions) and kl_to_teacher (per domain) at `step`;
    `outcomes` (the full held-out outcomes at this step), when given, supplies the accuracy."""
    if outcomes is None:
        outcomes = score(trainer.sampler, trainer, sched.n_curve, batch_size=sched.eval_batch_size,
                         label=f"curve step {step}")
    acc = {d: _mean(v[:sched.n_curve]) for d, v in outcomes.items()}
    kl = trainer.kl_to_teachers() if sched.n_curve_kl > 0 else {}
    return dict(step=step, accuracy=acc, kl_to_teacher=kl)


def train_with_curve(trainer: Trainer, sched: Schedule, batch_size: int) -> tuple:
    """Runs the trainer's steps (its train_step, logged to its metrics.jsonl), with a curve point every
    curve_every steps and the full held-out evaluation after the last. Returns (the step rows, the
    curve points after step 0, the final per-question outcomes)."""
    cfg, rows, curve = trainer.cfg, [], []
    if cfg.steps < 1:
        raise config_mod.ConfigError(f"steps must be >= 1 for an experiment arm, got {cfg.steps}")
    while trainer.step < cfg.steps:
        row = trainer.train_step()
        if row.get("skipped") and trainer.bad_steps >= cfg.max_bad_steps:
            raise TrainingStopped(f"{trainer.bad_steps} non-finite steps in a row in {cfg.out_dir}")
        trainer.log(row)
        rows.append(row)
        last = trainer.step == cfg.steps
        if last:
            final = score(trainer.sampler, trainer, batch_size=batch_size, label=f"final {cfg.out_dir}")
            curve.append(curve_point(trainer, trainer.step, sched, final))
        elif sched.curve_every and trainer.step % sched.curve_every == 0:
            curve.append(curve_point(trainer, trainer.step, sched))
    return rows, curve, final


def run_arms(cfg: config_mod.Config, arms: Sequence[Arm], seeds: Sequence[int], sched: Schedule,
             student=None, partial_path: Optional[str] = None, meta: Optional[dict] = None) -> dict:
    """Trains every (arm, seed) from the same initial student (`student`, a loaded (model, tokenizer),
    else cfg.student) and scores it; returns outcomes, curves, step rows and wall times (see the module
    docstring). The experts / teachers are built (or loaded from expert_cache) by the first trainer.
    Seeds are the outer loop; after each seed's arms, the run so far (those seeds only) is written to
    `partial_path` when given (with the entries of `meta`, e.g. the command), so a run stopped early keeps
    its finished seeds (combine reads it)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if len({a.name for a in arms}) != len(arms):
        raise config_mod.ConfigError(f"arms: names must be distinct, got {[a.name for a in arms]}")
    model, tok = student if student is not None else load_model(cfg.student, cfg.device)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    common = dict(data_seed=data_seed, eval_at_start=False, eval_teachers=False, save_final_model=False,
                  n_eval_kl=sched.n_curve_kl, eval_every=0, save_every=0)

    t = time.perf_counter()
    first = Trainer(dataclasses.replace(cfg, **common, out_dir=os.path.join(cfg.out_dir, "base")),
                    student=(model, tok))
    times = {"teachers": time.perf_counter() - t}
    t = time.perf_counter()
    outcomes = {}
    if sched.score_base:
        outcomes["base student"] = score(model, first, batch_size=sched.eval_batch_size, label="base student")
    start = curve_point(first, 0, sched, outcomes.get("base student"))
    times["base student eval"] = time.perf_counter() - t
    for dom in first.eval_domains() if sched.score_teachers else ():  # each teacher on its own domain
        t = time.perf_counter()
        outcomes[f"teacher[{dom}]"] = score(first.teacher_for(dom), first, prompt_fn=first.teacher_prompt,
                                            batch_size=sched.eval_batch_size, label=f"teacher[{dom}]",
                                            domains=[dom])
        times[f"teacher[{dom}] eval"] = time.perf_counter() - t
    note("base and teachers: " + json.dumps({k: {d: _mean(v) for d, v in o.items()} for k, o in outcomes.items()}))
    domains = first.eval_domains()
    n_questions = {d: sum(ex.domain == d for ex in first.eval_set) for d in domains}
    del first
    gc.collect()  # a trainer holds its own copies of the teachers and the reference: free them now

    curves, steps = {}, {}
    result = dict(outcomes=outcomes, curves=curves, steps=steps, wall_s=times, domain_names=domains,
                  n_questions=n_questions, arms=[dict(name=a.name, **a.overrides) for a in arms], seeds=[],
                  schedule=dataclasses.asdict(sched), **(meta or {}))
    for seed in seeds:
        for arm in arms:
            name = run_name(arm, seed)
            model.load_state_dict(initial)
            t = time.perf_counter()
            run_dir = os.path.join(cfg.out_dir, _slug(arm.name) + f"_seed{seed}")
            trainer = Trainer(dataclasses.replace(cfg, **common, **arm.overrides, seed=seed, out_dir=run_dir),
                              student=(model, tok))
            steps[name], curve, outcomes[name] = train_with_curve(trainer, sched, sched.eval_batch_size)
            curves[name] = [start] + curve
            times[name] = time.perf_counter() - t
            note(f"{name}: " + json.dumps({d: _mean(v) for d, v in outcomes[name].items()}) + f" ({times[name]:.0f}s)")
            del trainer
            gc.collect()
        result["seeds"].append(seed)
        if partial_path:
            os.makedirs(os.path.dirname(partial_path) or ".", exist_ok=True)
            with open(partial_path + ".tmp", "w") as fh:
                json.dump(result, fh)
            os.replace(partial_path + ".tmp", partial_path)
    model.load_state_dict(initial)
    return result


def rollout_kl_to_teacher(row: dict, lam: float) -> float:
    """KL(student || teacher) per token on a step's training rollouts, from the step's diagnostics: the
    loss's kl = E_s[log p_s - log p_r] and reward = lam E_s[log p_t - log p_r] give
    kl - reward / lam = E_s[log p_s - log p_t] (exact over the vocabulary in mode full, a one-sample
    estimate in mode sampled); measured before the step's update. nan at lam = 0 (no teacher term)."""
    if lam == 0 or "kl" not in row or "reward" not in row:
        return float("nan")
    return row["kl"] - row["reward"] / lam


def run_name(arm: Arm, seed: int) -> str:
    return f"{arm.name} seed={seed}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def _mean(xs) -> float:
    return sum(map(float, xs)) / max(1, len(xs))


def seed_averaged(outcomes: dict, names: Sequence[str], dom: str) -> List[float]:
    """Per question of `dom`: the mean of its 0/1 outcomes over the runs `names` (the seeds of one arm)."""
    rows = [outcomes[n][dom] for n in names]
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"seed_averaged: the runs {list(names)} scored different numbers of {dom} questions")
    return [sum(float(r[q]) for r in rows) / len(rows) for q in range(len(rows[0]))]


def summarize(run: dict, baseline: str) -> dict:
    """Per domain: each arm's and each single model's pass@1 with a 95% Wilson interval over the
    domain's questions (arms: seed-averaged per question, with the per-seed rates), and each arm's
    paired difference to `baseline` (an arm name; None when there are no arms) with its 95% interval and
    verdict. A text table too."""
    arm_names = [a["name"] for a in run["arms"]]
    if arm_names and baseline not in arm_names:
        raise ValueError(f"summarize: baseline {baseline!r} is not an arm ({arm_names})")
    seeds, outcomes = run["seeds"], run["outcomes"]
    singles = [k for k in outcomes if not any(k == run_name(Arm(a, {}), s) for a in arm_names for s in seeds)]
    table, lines = {}, [f"{'domain':6s} {'model':28s} {'pass@1':>7s} {'95% CI':>13s}  per seed"]
    for dom in run["domain_names"]:
        per_q = {name: [float(x) for x in outcomes[name][dom]] for name in singles if dom in outcomes[name]}
        for arm in arm_names:
            per_q[arm] = seed_averaged(outcomes, [run_name(Arm(arm, {}), s) for s in seeds], dom)
        models = {}
        for name, xs in per_q.items():
            models[name] = dict(accuracy=_mean(xs), ci95=list(wilson_interval(_mean(xs), len(xs))), n_questions=len(xs))
            if name in arm_names:
                models[name]["per_seed"] = [_mean(outcomes[run_name(Arm(name, {}), s)][dom]) for s in seeds]
        comparisons = {}
        for arm in arm_names:
            if arm != baseline:
                d, half = paired_difference(per_q[arm], per_q[baseline])
                comparisons[f"{arm} - {baseline}"] = dict(
                    diff=d, half_width=half, ci95=[d - half, d + half],
                    verdict="higher" if d - half > 0 else "lower" if d + half < 0 else "no significant difference",
                    seed_level=seed_level_difference(models[arm]["per_seed"], models[baseline]["per_seed"]))
        table[dom] = dict(models=models, comparisons=comparisons)
        for name, r in models.items():
            lo, hi = r["ci95"]
            seeds_txt = " ".join(f"{x:.3f}" for x in r.get("per_seed", []))
            lines.append(f"{dom:6s} {name:28s} {r['accuracy']:7.3f} {f'[{lo:.3f}, {hi:.3f}]':>13s}  {seeds_txt}")
        for name, c in comparisons.items():
            lines.append(f"{dom:6s} {name}: {c['diff']:+.3f} +- {c['half_width']:.3f} (95%, paired): {c['verdict']}")
            sl = c["seed_level"]
            if sl["half_width"] is not None:
                lines.append(f"{dom:6s} {'':{len(name)}s}  {sl['diff']:+.3f} +- {sl['half_width']:.3f} (95%, seeds as "
                             f"the unit, t with {len(seeds) - 1} df): {sl['verdict']}")
    return dict(domains=table, table="\n".join(lines))


def plot(result: dict, path: str, title: str) -> None:
    """Per domain: accuracy and KL-to-teacher over the steps (one line per arm, the mean over the seeds,
    the seeds faint), and the final pass@1 of every model with its 95% interval."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    domains, arms, seeds = result["domain_names"], [a["name"] for a in result["arms"]], result["seeds"]
    fig, axes = plt.subplots(len(domains) + 1, 3, figsize=(13, 3.2 * (len(domains) + 1)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, dom in enumerate(domains):
        for col, (metric, label) in enumerate([("accuracy", "pass@1 (curve questions)"),
                                               ("kl_to_teacher", "KL(student || teacher)")]):
            ax = axes[row][col]
            for i, arm in enumerate(arms):
                runs = [result["curves"][run_name(Arm(arm, {}), s)] for s in seeds]
                xs = [p["step"] for p in runs[0]]
                ys = [[p[metric].get(dom, float("nan")) for p in r] for r in runs]
                for y in ys:
                    ax.plot(xs, y, color=colors[i % len(colors)], alpha=0.25, lw=0.8)
                ax.plot(xs, [sum(v) / len(v) for v in zip(*ys)], color=colors[i % len(colors)], marker="o",
                        ms=3, label=arm)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.set_title(f"{dom}: {label}", fontsize=9)
            ax.legend(fontsize=7)
        ax = axes[row][2]
        models = result["domains"][dom]["models"]
        names = list(models)
        accs = [models[n]["accuracy"] for n in names]
        err = [[a - models[n]["ci95"][0] for a, n in zip(accs, names)],
               [models[n]["ci95"][1] - a for a, n in zip(accs, names)]]
        ax.barh(range(len(names)), accs, xerr=err, capsize=3,
                color=[colors[arms.index(n) % len(colors)] if n in arms else "0.6" for n in names])
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"held-out pass@1, {models[names[0]]['n_questions']} questions (95% CI)")
        ax.set_title(f"{dom}: final", fontsize=9)
    ax = axes[len(domains)][0]
    for i, arm in enumerate(result["arms"]):
        runs = [result["steps"][run_name(Arm(arm["name"], {}), s)] for s in seeds]
        ys = [[rollout_kl_to_teacher(r, arm.get("lam", result["config"]["lam"])) for r in rows] for rows in runs]
        xs = [r["step"] - 1 for r in runs[0]]
        for y in ys:
            ax.plot(xs, y, color=colors[i % len(colors)], alpha=0.25, lw=0.8)
        ax.plot(xs, [sum(v) / len(v) for v in zip(*ys)], color=colors[i % len(colors)], label=arm["name"])
    ax.set_xlabel("step (weights before the update)")
    ax.set_ylabel("KL(student || teacher)")
    ax.set_title("training rollouts, all domains", fontsize=9)
    ax.legend(fontsize=7)
    for ax in axes[len(domains)][1:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(result: dict, out_dir: str, stem: str, title: str) -> str:
    """result -> out_dir/stem.json and out_dir/stem.png; returns the JSON path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem)
    with open(path + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    plot(result, path + ".png", title)
    return path + ".json"
