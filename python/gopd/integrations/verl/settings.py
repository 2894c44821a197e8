"""The G-OPD options of the verl plug-in and the verl settings G-OPD needs (no verl import here).

Options (one value per run, the same in the driver and every Ray worker):
    lam        reward scale; the training config's ``+gopd.lam=1.25`` or the environment variable GOPD_LAM
    advantage  which student log-prob the advantage subtracts: "current" (gopd's convention, the log-prob of
               the weights being trained, detached) or "old" (the authors' fork: the log-prob of the policy
               that sampled, verl's ``old_log_probs``); ``+gopd.advantage=old`` or GOPD_ADVANTAGE.
               On-policy (one PPO step per batch) the two are the same number.

The config keys are read on the driver at start-up (``check_config``), which also writes them into Ray's
``runtime_env`` as GOPD_LAM / GOPD_ADVANTAGE, so every worker reads the same values from its environment.

``problems(view)`` is the one list of rules: ``view`` maps verl's dotted setting names to their values (the
driver passes the whole training config, a worker the part it sees); each broken rule gives a sentence that
names the setting and the value to set. Rules whose settings are absent from the view are skipped.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from gopd_kernels import ADVANTAGE_FROM as ADVANTAGES

LOSS_SAMPLED = "gopd"
LOSS_TOPK = "gopd_topk"
LOSS_NAMES = (LOSS_SAMPLED, LOSS_TOPK)
ENV_LAM = "GOPD_LAM"
ENV_ADVANTAGE = "GOPD_ADVANTAGE"

_DL = "distillation.distillation_loss"
_ACTOR = "actor_rollout_ref.actor"
_ROLLOUT = "actor_rollout_ref.rollout"
_IS = "algorithm.rollout_correction"

# Every setting a rule reads: what the driver selects from the training config.
SETTINGS = (
    "distillation.enabled", f"{_DL}.loss_mode", f"{_DL}.use_task_rewards", f"{_DL}.use_policy_gradient",
    f"{_DL}.policy_loss_mode", f"{_DL}.loss_max_clamp",
    f"{_ACTOR}.use_kl_loss", f"{_ACTOR}.kl_loss_coef", f"{_ACTOR}.use_fused_kernels", f"{_ACTOR}.strategy",
    f"{_ROLLOUT}.temperature", f"{_ROLLOUT}.top_p", f"{_ROLLOUT}.top_k", f"{_ROLLOUT}.calculate_log_probs",
    "algorithm.use_kl_in_reward",
    f"{_IS}.rollout_is", f"{_IS}.rollout_is_threshold", f"{_IS}.rollout_is_batch_normalize",
    f"{_IS}.rollout_rs", f"{_IS}.bypass_mode",
)


class GOPDVerlConfigError(ValueError):
    """A verl setting (or a gopd option) that G-OPD cannot run with; the message names each one."""


@dataclass(frozen=True)
class Options:
    lam: float = 1.0
    advantage: str = "current"


def parse_lam(value, source: str) -> float:
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise GOPDVerlConfigError(f"{source}: expected a number (the reward scale lam, e.g. 1.25), got {value!r}")
    if not math.isfinite(lam):
        raise GOPDVerlConfigError(f"{source}: expected a finite number, got {value!r}")
    return lam


def parse_advantage(value, source: str) -> str:
    if value not in ADVANTAGES:
        raise GOPDVerlConfigError(f"{source}: expected one of {list(ADVANTAGES)}, got {value!r}")
    return value


def options_from_env(environ=None) -> Options:
    """The options as a worker sees them: GOPD_LAM (default 1) and GOPD_ADVANTAGE (default "current")."""
    env = os.environ if environ is None else environ
    lam = parse_lam(env[ENV_LAM], ENV_LAM) if env.get(ENV_LAM, "") != "" else 1.0
    adv = parse_advantage(env[ENV_ADVANTAGE], ENV_ADVANTAGE) if env.get(ENV_ADVANTAGE, "") != "" else "current"
    return Options(lam=lam, advantage=adv)


def resolve_options(gopd_section, environ=None) -> Options:
    """The run's options from the config's ``gopd`` section (a mapping or None) and the environment.

    A value given both ways must agree: the driver exports the config's value to the workers, so a
    different one in the driver's environment would mean two lams in one run."""
    env = options_from_env(environ)
    section = dict(gopd_section or {})
    unknown = sorted(set(section) - {"lam", "advantage"})
    if unknown:
        raise GOPDVerlConfigError(f"gopd.{unknown[0]}: not an option of the gopd plug-in (options: gopd.lam, "
                                  "gopd.advantage)")
    env_vars = os.environ if environ is None else environ
    lam, adv = env.lam, env.advantage
    if section.get("lam") is not None:
        lam = parse_lam(section["lam"], "gopd.lam")
        if env_vars.get(ENV_LAM, "") != "" and env.lam != lam:
            raise GOPDVerlConfigError(f"gopd.lam={lam} and the environment's {ENV_LAM}={env.lam} disagree; "
                                      "set one of them")
    if section.get("advantage") is not None:
        adv = parse_advantage(section["advantage"], "gopd.advantage")
        if env_vars.get(ENV_ADVANTAGE, "") != "" and env.advantage != adv:
            raise GOPDVerlConfigError(f"gopd.advantage={adv} and the environment's {ENV_ADVANTAGE}="
                                      f"{env.advantage} disagree; set one of them")
    return Options(lam=lam, advantage=adv)


def problems(view: dict, options: Options) -> list:
    """Sentences, one per verl setting that G-OPD cannot run with (empty: all good).

    view: verl's dotted setting names (see SETTINGS) -> values; absent names are not checked."""
    out = []

    def bad(key, cond, sentence):
        if key in view and cond(view[key]):
            out.append(f"{key}={view[key]!r}: {sentence}")

    mode = view.get(f"{_DL}.loss_mode")
    lam = options.lam
    bad("distillation.enabled", lambda v: not v, "set distillation.enabled=True (the gopd losses are verl "
        "distillation losses; the teacher's log-probs come from verl's teacher servers)")
    bad(f"{_DL}.use_task_rewards", bool, f"set {_DL}.use_task_rewards=False: G-OPD's reward is the teacher's "
        "log-ratio; task rewards would add a second objective")
    bad(f"{_DL}.loss_max_clamp", lambda v: v is not None, f"set {_DL}.loss_max_clamp=null: a clamp changes "
        "the G-OPD advantage (the paper does not clamp it)")
    if mode == LOSS_SAMPLED:
        bad(f"{_DL}.use_policy_gradient", lambda v: not v, f"set {_DL}.use_policy_gradient=True: the sampled "
            "G-OPD estimator is a policy gradient with advantage -loss")
        bad(f"{_DL}.policy_loss_mode", lambda v: v != "vanilla", f"set {_DL}.policy_loss_mode=vanilla (PPO's "
            "clipped objective with dual clip, as in the paper)")
        if lam != 1.0:
            bad(f"{_ACTOR}.use_kl_loss", lambda v: not v, f"set {_ACTOR}.use_kl_loss=True (with "
                f"{_ACTOR}.kl_loss_coef=0): lam={lam} != 1 needs the reference's log-probs, and verl computes "
                "ref_log_prob only for its KL loss")
    if mode == LOSS_TOPK:
        bad(f"{_DL}.use_policy_gradient", bool, f"set {_DL}.use_policy_gradient=False: gopd_topk is the "
            "G-OPD objective over the teacher's top-k buckets, differentiated directly")
        bad(f"{_ACTOR}.use_fused_kernels", bool, f"set {_ACTOR}.use_fused_kernels=False: verl's top-k "
            "losses need the student's logits")
        bad(f"{_ACTOR}.strategy", lambda v: v not in ("fsdp", "fsdp2", "veomni"), "gopd_topk runs under "
            "FSDP (fsdp, fsdp2, veomni); with megatron, use gopd")
        if lam != 1.0:
            out.append(f"{ENV_LAM}={lam}: gopd_topk needs lam = 1: lam != 1 needs the reference's "
                       "probabilities of the teacher's top-k ids and of the tail, which verl does not compute "
                       "(its ref worker returns the sampled token's log-prob only); use loss_mode=gopd for "
                       "lam != 1")
    bad(f"{_ACTOR}.use_kl_loss", lambda v: v and view.get(f"{_ACTOR}.kl_loss_coef", 0) != 0,
        f"set {_ACTOR}.kl_loss_coef=0: the KL to the reference is already inside the G-OPD advantage")
    bad("algorithm.use_kl_in_reward", bool, "set algorithm.use_kl_in_reward=False: the KL to the reference "
        "is already inside the G-OPD advantage")
    bad(f"{_ROLLOUT}.temperature", lambda v: float(v) != 1.0, f"set {_ROLLOUT}.temperature=1.0: G-OPD "
        "scores samples of the student at temperature 1 and verl's teacher log-probs are at temperature 1")
    bad(f"{_ROLLOUT}.top_p", lambda v: float(v) != 1.0, f"set {_ROLLOUT}.top_p=1.0: top-p sampling is not "
        "the student's distribution (off-policy)")
    bad(f"{_ROLLOUT}.top_k", lambda v: v not in (None, -1, 0), f"set {_ROLLOUT}.top_k=-1: top-k sampling is "
        "not the student's distribution (off-policy)")
    rollout_is = view.get(f"{_IS}.rollout_is")
    bad(f"{_IS}.rollout_is", lambda v: v not in (None, "token"), f"set {_IS}.rollout_is=token: G-OPD's "
        "importance weight is per token, min(exp(lp_old - lp_rollout), cap) (or null for none)")
    if rollout_is is not None:
        bad(f"{_IS}.rollout_is_threshold", lambda v: not _is_number(v), f"set {_IS}.rollout_is_threshold to "
            "one number, the cap (the paper: 5.0); a 'lower_upper' range drops tokens instead of capping")
        bad(f"{_IS}.rollout_is_batch_normalize", bool, f"set {_IS}.rollout_is_batch_normalize=False")
        bad(f"{_ROLLOUT}.calculate_log_probs", lambda v: not v, f"set {_ROLLOUT}.calculate_log_probs=True: "
            "the importance weight needs the rollout engine's log-probs")
    bad(f"{_IS}.rollout_rs", lambda v: v is not None, f"set {_IS}.rollout_rs=null: rejection sampling drops "
        "tokens from the G-OPD objective")
    bad(f"{_IS}.bypass_mode", bool, f"set {_IS}.bypass_mode=False: in bypass mode the PPO ratio is taken "
        "against the rollout engine and no truncated importance weight is applied")
    return out


def _is_number(v) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def raise_problems(found: list, where: str) -> None:
    if found:
        lines = "\n  - ".join(found)
        raise GOPDVerlConfigError(f"gopd verl plug-in ({where}): {len(found)} setting(s) G-OPD cannot run "
                                  f"with:\n  - {lines}")
