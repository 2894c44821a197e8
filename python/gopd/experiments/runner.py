"""What `gopd experiment lam-sweep` and `gopd experiment reward-correction` share: their YAML (a gopd
config plus an ``experiment:`` block of the experiment's own settings), the command line that is
recorded, and the post-hoc power figures written beside the results."""

from __future__ import annotations

import shlex
import time
from typing import Callable, Optional, Sequence, Tuple

import yaml

from .. import config as config_mod
from .arms import Arm, Schedule, run_name, summarize, write
from .stats import min_detectable_difference, seed_within_variance


def load(path: str, overrides: Sequence[str], defaults: dict) -> Tuple[config_mod.Config, dict]:
    """(the gopd config, the experiment block) of an experiment YAML. `--set experiment.KEY=VALUE`
    overrides a key of the experiment block (`defaults` names the valid ones), any other `--set` the config."""
    with open(path) as fh:
        values = yaml.safe_load(fh) or {}
    if not isinstance(values, dict):
        raise config_mod.ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    block = dict(defaults, **(values.pop("experiment", None) or {}))
    rest = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if key.strip().startswith("experiment."):
            if not sep:
                raise config_mod.ConfigError(f"--set expects key=value, got {item!r}")
            block[key.strip()[len("experiment."):]] = yaml.safe_load(raw)
        else:
            rest.append(item)
    unknown = sorted(set(block) - set(defaults))
    if unknown:
        raise config_mod.ConfigError(f"{path}: unknown experiment key(s) {unknown}; valid: {sorted(defaults)}")
    return config_mod.load(None, tuple(rest), base=values), block


def schedule(block: dict) -> Schedule:
    """The Schedule of an experiment block (curve_every, n_curve, n_curve_kl, eval_batch_size, score_base, score_teachers)."""
    fields = {k: block[k] for k in ("curve_every", "n_curve", "n_curve_kl", "eval_batch_size") if k in block}
    for k, v in fields.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if k == "eval_batch_size" else 0):
            raise config_mod.ConfigError(f"experiment.{k} must be an int >= {1 if k == 'eval_batch_size' else 0}, "
                                         f"got {v!r}")
    for k in ("score_base", "score_teachers"):
        if not isinstance(block.get(k, True), bool):
            raise config_mod.ConfigError(f"experiment.{k} must be true or false, got {block[k]!r}")
        fields[k] = block.get(k, True)
    return Schedule(**fields)


def command(sub: str, argv: Sequence[str]) -> str:
    return f"gopd experiment {sub} " + " ".join(shlex.quote(a) for a in argv)


def power_after(run: dict, summary: dict, arms: Sequence[Arm], baseline: str,
                alpha: float = 0.05, power: float = 0.8) -> dict:
    """Per domain, the minimum detectable difference of this design at the measured rates: the
    within-question seed variance w pooled over the arms (seed_within_variance), and the baseline's
    pass@1; `bound` uses the upper bound w = p (1 - p)."""
    out = {}
    seeds = run["seeds"]
    for dom in run["domain_names"]:
        n = run["n_questions"][dom]
        p = summary["domains"][dom]["models"][baseline]["accuracy"]
        w = None
        if len(seeds) >= 2:
            ws = [seed_within_variance([run["outcomes"][run_name(a, s)][dom] for s in seeds]) for a in arms]
            w = sum(ws) / len(ws)
        out[dom] = dict(n_questions=n, seeds=len(seeds), baseline_accuracy=p, within_seed_variance=w,
                        mdd_measured_w=None if w is None else min_detectable_difference(p, n, len(seeds), alpha,
                                                                                         power, within=w),
                        mdd_bound=min_detectable_difference(p, n, len(seeds), alpha, power),
                        alpha=alpha, power=power)
    return out


def optional_float_list(block: dict, key: str) -> Optional[list]:
    v = block.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise config_mod.ConfigError(f"experiment.{key} must be a non-empty list of numbers, got {v!r}")
    return [float(x) for x in v]


def finish(result: dict, *, cfg, block: dict, cmd: str, arms: Sequence[Arm], baseline: str, out_dir: str, name: str,
           title: str, t0: float, **extra) -> dict:
    """An experiment's last step: the summary against `baseline`, the power after the run, the command, the
    config and the time into `result`, written as `name`.json / .png under `out_dir`, and its table printed."""
    summary = summarize(result, baseline=baseline)
    result.update(summary, command=cmd, experiment=dict(block), **extra,
                  power=power_after(result, summary, arms, baseline) if arms else {},
                  total_s=time.perf_counter() - t0, config=config_mod.to_dict(cfg), device=str(cfg.device))
    write(result, out_dir, name, title)
    print(result["table"])
    return result


def main_for(sub: str, default_yaml: str, defaults: dict, gpu_overrides: tuple, run: Callable) -> Callable:
    """The `gopd experiment <sub>` entry point of an experiment whose `run(cfg, block, seeds, out_dir, tag, cmd)`
    does the work: its YAML (or `config`) with `overrides`, and the --gpu scale's overrides first."""
    def main(argv: Sequence[str], config: Optional[str], overrides: tuple, seeds: Sequence[int], out_dir: str,
             gpu: bool) -> dict:
        if gpu:
            overrides = tuple(gpu_overrides) + tuple(overrides)
        cfg, block = load(config or default_yaml, overrides, defaults)
        return run(cfg, block, seeds, out_dir, "gpu" if gpu else "cpu", command(sub, argv))
    return main
