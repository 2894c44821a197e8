"""`gopd experiment merge`: the paper's merge experiment in miniature.

Two domain experts are made from the same student by a short SFT on their own domain's training
questions (gopd.sft, cached); then the student, from its initial weights, is distilled from both at once
with multi-teacher routing (each question's domain picks its teacher) and its initial weights as the
reference pi_r, once with lam = 1 (OPD) and once with lam = 1.25 (ExOPD), for each seed. The seed changes
the sampling only: questions (``data_seed``), experts and held-out evaluation are the same in every arm.

Reported per domain, on the same held-out questions: pass@1 of the base student, of each expert, and of
the merged students (each question's outcome averaged over the seeds), with 95% Wilson intervals over the
questions, and the paired 95% intervals of merged - own expert and ExOPD - OPD, question by question. The paper's claim, in this setting, is that the
merged student reaches or passes each expert on the expert's own domain, and that ExOPD does better than
OPD. Writes merge.json (everything, the command and the wall times) and merge.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time
from typing import Dict, List, Optional, Sequence

import torch

from .. import config as config_mod
from ..eval import evaluate
from ..models import load_model
from ..progress import note, phase
from ..trainer import Trainer
from .stats import paired_difference, wilson_interval

MERGE_YAML = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "merge.yaml")
LAMS = (1.0, 1.25)


def merge_config(path: Optional[str] = None, overrides: tuple = ()) -> config_mod.Config:
    return config_mod.load(path or MERGE_YAML, overrides)


def _score(model, trainer: Trainer, prompt_fn=None) -> Dict[str, List[bool]]:
    """Per domain, the per-question outcomes (greedy pass@1, strict verifier) of `model` on the held-out set."""
    out = {}
    for dom in trainer.eval_domains():
        subset = [ex for ex in trainer.eval_set if ex.domain == dom]
        kept: list = []
        evaluate(model, trainer.codec, trainer.engine, subset, max_new_tokens=trainer.cfg.eval_max_new_tokens,
                 verifier=trainer.cfg.verifier, prompt_fn=prompt_fn, outcomes=kept, desc=f"eval {dom}")
        out[dom] = kept
    return out


def run_merge(cfg: config_mod.Config, seeds: Sequence[int] = (0, 1), out_dir: str = "results",
              tag: str = "cpu", command: str = "") -> dict:
    t0 = time.perf_counter()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if not cfg.teachers or len(cfg.teachers) < 2:
        raise config_mod.ConfigError("the merge experiment needs 'teachers' with one expert per domain (>= 2)")
    runs = phase("merge", total=1 + len(LAMS) * len(seeds))  # the experts, then one run per arm and seed
    model, tok = load_model(cfg.student, cfg.device)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    common = dict(data_seed=data_seed, eval_at_start=False, eval_teachers=False, save_final_model=False,
                  reference=cfg.student, n_eval_kl=0)

    # The base student and the experts (built or loaded by the first trainer), each on every domain.
    t = time.perf_counter()
    first = Trainer(dataclasses.replace(cfg, **common, out_dir=os.path.join(cfg.out_dir, "base")), student=(model, tok))
    times = {"experts": time.perf_counter() - t}
    outcomes = {"base student": _score(model, first)}
    for dom in sorted(first.teachers):
        t = time.perf_counter()
        outcomes[f"expert[{dom}]"] = _score(first.teachers[dom], first)
        times[f"expert[{dom}] eval"] = time.perf_counter() - t
    note("base and experts: " + json.dumps({k: {d: _mean(v) for d, v in o.items()} for k, o in outcomes.items()}))
    domains = first.eval_domains()
    del first
    runs.advance()

    curves = {}
    for lam in LAMS:
        for seed in seeds:
            name = f"merged lam={lam:g} seed={seed}"
            model.load_state_dict(initial)
            t = time.perf_counter()
            trainer = Trainer(dataclasses.replace(cfg, **common, lam=lam, seed=seed,
                                                  out_dir=os.path.join(cfg.out_dir, f"lam{lam:g}_seed{seed}")),
                              student=(model, tok))
            curves[name] = trainer.train()
            outcomes[name] = {d: list(v) for d, v in trainer.last_outcomes.items()}  # the final evaluation
            times[name] = time.perf_counter() - t
            note(f"{name}: " + json.dumps({d: _mean(v) for d, v in outcomes[name].items()}) + f" ({times[name]:.0f}s)")
            del trainer
            runs.advance()
    runs.close()

    result = _summarize(outcomes, domains, seeds)
    result.update(command=command, seeds=list(seeds), lams=list(LAMS), wall_s=times,
                  total_s=time.perf_counter() - t0, config=config_mod.to_dict(cfg), curves=curves,
                  device=str(cfg.device), outcomes=outcomes)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"merge_{tag}")
    with open(stem + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    _plot(result, stem + ".png")
    print(result["table"])
    return result


def _mean(xs) -> float:
    return sum(map(float, xs)) / max(1, len(xs))


def _summarize(outcomes: dict, domains: List[str], seeds: Sequence[int]) -> dict:
    """Per domain: each model's pass@1 with a 95% Wilson interval over the domain's questions; for the
    merged arms the per-question outcome is averaged over the seeds first (the question is the unit: the
    seeds re-sample the same questions, they do not add new ones). merged - own expert and ExOPD - OPD are
    paired differences per question with 95% intervals; the verdicts."""
    arms = {"merged OPD (lam=1)": [f"merged lam=1 seed={s}" for s in seeds],
            "merged ExOPD (lam=1.25)": [f"merged lam=1.25 seed={s}" for s in seeds]}
    singles = [k for k in outcomes if not k.startswith("merged")]
    table = {}
    lines = [f"{'domain':6s} {'model':26s} {'pass@1':>7s} {'95% CI':>13s}"]
    for dom in domains:
        per_question = {name: [float(x) for x in outcomes[name][dom]] for name in singles}
        for arm, names in arms.items():
            per_question[arm] = [sum(float(outcomes[n][dom][q]) for n in names) / len(names)
                                 for q in range(len(outcomes[names[0]][dom]))]
        rows = {}
        for name, xs in per_question.items():
            rows[name] = dict(accuracy=_mean(xs), ci95=wilson_interval(_mean(xs), len(xs)), n_questions=len(xs))
            if name in arms:
                rows[name]["per_seed"] = [_mean(outcomes[n][dom]) for n in arms[name]]
        own = f"expert[{dom}]"
        comparisons = {f"{arm} - {own}": _verdict(*paired_difference(per_question[arm], per_question[own]),
                                                  "passes", "below", "level with") for arm in arms}
        comparisons["ExOPD - OPD"] = _verdict(*paired_difference(per_question["merged ExOPD (lam=1.25)"],
                                                                 per_question["merged OPD (lam=1)"]),
                                              "ExOPD better", "OPD better", "no significant difference")
        table[dom] = dict(models=rows, comparisons=comparisons)
        for name, r in rows.items():
            lo, hi = r["ci95"]
            lines.append(f"{dom:6s} {name:26s} {r['accuracy']:7.3f} {f'[{lo:.2f}, {hi:.2f}]':>13s}")
        for name, c in comparisons.items():
            lines.append(f"{dom:6s} {name}: {c['diff']:+.3f} +- {c['half_width']:.3f} (95%, paired): {c['verdict']}")
    return dict(domains=table, table="\n".join(lines))


def _verdict(d: float, half: float, up: str, down: str, level: str) -> dict:
    return dict(diff=d, half_width=half, verdict=up if d - half > 0 else down if d + half < 0 else level)


def _plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    domains = list(result["domains"])
    names = list(result["domains"][domains[0]]["models"])
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(names), 3.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        accs = [result["domains"][d]["models"][name]["accuracy"] for d in domains]
        los = [a - result["domains"][d]["models"][name]["ci95"][0] for a, d in zip(accs, domains)]
        his = [result["domains"][d]["models"][name]["ci95"][1] - a for a, d in zip(accs, domains)]
        ax.bar([j + (i - (len(names) - 1) / 2) * width for j in range(len(domains))], accs, width,
               yerr=[los, his], capsize=3, label=name)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("held-out pass@1 (95% CI)")
    ax.set_title("merge experiment: experts distilled back into one student")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str], config: Optional[str], overrides: tuple, seeds: Sequence[int], out_dir: str,
         gpu: bool) -> dict:
    if gpu:  # the larger run of one CUDA GPU: 2-digit questions (512 held out per domain), more steps
        overrides = ("device=cuda", "synthetic_digits=2", "n_train=512", "n_eval=1024", "steps=40",
                     "batch_size=32", "micro_batch_size=32", "threads=0") + tuple(overrides)
    cfg = merge_config(config, tuple(overrides))
    command = "gopd experiment merge " + " ".join(shlex.quote(a) for a in argv)
    return run_merge(cfg, seeds=seeds, out_dir=out_dir, tag="gpu" if gpu else "cpu", command=command.strip())

