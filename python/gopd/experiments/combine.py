"""Joins experiment parts run in separate processes (one arm each, say) into one result, re-summarized.

    python -m gopd.experiments.combine --kind lam-sweep --baseline lam=1 --out results/lam_sweep_cpu \\
        part_a.json part_b.json part_c.json

The parts must share the questions, the seeds and the teachers (the same config but the arms); that is
checked on the per-question outcomes of the models they have in common (the same greedy model scores the
same questions identically). Outcomes, curves, step rows, arms and wall times are joined; the summary,
the power figures and the plot are recomputed; the commands of the parts are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Sequence

from .arms import Arm, summarize, write
from .runner import power_after

TITLES = {"lam-sweep": "lam sweep in the merge setting: OPD (lam=1) vs ExOPD",
          "reward-correction": "strong-to-weak ExOPD: reference = student's initial weights vs the experts' base"}


def restrict(part: dict, seeds: Sequence[int]) -> dict:
    """The part with only its runs of `seeds` (those it has finished)."""
    keep = set(seeds) & set(part["seeds"])
    drop = {f" seed={s}" for s in part["seeds"]} - {f" seed={s}" for s in keep}
    out = dict(part, seeds=sorted(keep))
    for key in ("outcomes", "curves", "steps"):
        out[key] = {k: v for k, v in part[key].items() if not any(k.endswith(d) for d in drop)}
    return out


def combine(parts: Sequence[dict], baseline: str, seeds: Sequence[int] = None) -> dict:
    """Joins the parts (see the module docstring). Without `seeds` every part must hold the same seeds;
    with `seeds`, each part gives its finished runs of those seeds (an arm's seeds may come from several
    parts: one stopped early, one that ran the rest), and every arm must end up with all of them."""
    if len(parts) < 1:
        raise ValueError("combine: no parts given")
    if seeds is not None:
        parts = [restrict(p, seeds) for p in parts]
    first = parts[0]
    out = dict(first, outcomes={}, curves={}, steps={}, wall_s={}, arms=[], commands=[], part_total_s=[])
    for i, part in enumerate(parts):
        if (seeds is None and part["seeds"] != first["seeds"]) or part["domain_names"] != first["domain_names"]:
            raise ValueError(f"combine: part {i} has seeds {part['seeds']} / domains {part['domain_names']}, "
                             f"part 0 has {first['seeds']} / {first['domain_names']}")
        for name, oc in part["outcomes"].items():
            if name in out["outcomes"] and out["outcomes"][name] != oc:
                raise ValueError(f"combine: part {i} scores {name!r} differently from an earlier part: the "
                                 "parts do not share the questions or the models")
            out["outcomes"][name] = oc
        if part["curves"] and first["curves"]:  # every arm starts from the same student: one step-0 point
            p0, f0 = next(iter(part["curves"].values()))[0], next(iter(first["curves"].values()))[0]
            if p0["accuracy"] != f0["accuracy"]:
                raise ValueError(f"combine: part {i} starts from a different student (step-0 accuracy "
                                 f"{p0['accuracy']} vs {f0['accuracy']})")
        for key in ("curves", "steps"):
            out[key].update(part[key])
        out["wall_s"].update({f"part {i}: {k}": v for k, v in part["wall_s"].items()})
        out["arms"] += [a for a in part["arms"] if a["name"] not in {b["name"] for b in out["arms"]}]
        out["commands"].append(part.get("command", ""))
        out["part_total_s"].append(part.get("total_s"))
    if seeds is not None:
        out["seeds"] = list(seeds)
        missing = [f"{a['name']} seed={s}" for a in out["arms"] for s in seeds
                   if f"{a['name']} seed={s}" not in out["outcomes"]]
        if missing:
            raise ValueError(f"combine: no part has finished {missing}")
    arms = [Arm(a["name"], {}) for a in out["arms"]]
    summary = summarize(out, baseline)
    out.update(summary, power=power_after(out, summary, arms, baseline))
    out["command"] = " && ".join(c for c in out["commands"] if c)
    return out


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gopd.experiments.combine", description=__doc__.split("\n")[0])
    p.add_argument("parts", nargs="+", help="the parts' JSON files")
    p.add_argument("--kind", choices=sorted(TITLES), required=True)
    p.add_argument("--baseline", required=True, help="the arm the paired differences are taken against")
    p.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.png")
    p.add_argument("--seeds", type=int, nargs="+", help="keep only these seeds (parts stopped early: their "
                   "finished seeds, from the .partial.json files)")
    args = p.parse_args(argv)
    parts = []
    for path in args.parts:
        with open(path) as fh:
            parts.append(json.load(fh))
    result = combine(parts, args.baseline, args.seeds)
    result["combine_command"] = "python -m gopd.experiments.combine " + " ".join(sys.argv[1:] if argv is None else argv)
    write(result, os.path.dirname(args.out) or ".", os.path.basename(args.out), TITLES[args.kind])
    print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
