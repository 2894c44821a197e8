"""The driver's start-up check: the whole training config, before Ray starts (imports omegaconf only).

verl's launcher (``python -m verl.trainer.main_ppo``) validates the composed config with
``verl.utils.config.validate_config`` before it starts Ray. The plug-in is imported earlier (on
``import verl``), and ``install_driver_check`` wraps that function: verl's own validation first, then
``check_config`` on the same config. So a run with ``loss_mode=gopd`` or ``gopd_topk`` and a setting
G-OPD cannot run with stops at start-up with a message naming the setting.
"""

from __future__ import annotations

import os

from . import settings as S

_ABSENT = object()


def check_config(config):
    """Checks a verl training config (OmegaConf) for the gopd losses; returns the Options, or None when the
    run uses another loss. Exports the options to the driver's environment and to Ray's runtime_env
    (``ray_kwargs.ray_init.runtime_env.env_vars``), so every worker reads the same lam."""
    from omegaconf import OmegaConf, open_dict

    mode = OmegaConf.select(config, "distillation.distillation_loss.loss_mode", default=None)
    section = OmegaConf.select(config, "gopd", default=None)
    if mode not in S.LOSS_NAMES:
        if section is not None:
            S.raise_problems([f"distillation.distillation_loss.loss_mode={mode!r}: the config has a gopd "
                              f"section; set loss_mode to one of {list(S.LOSS_NAMES)}"], "start-up check")
        return None
    section = OmegaConf.to_container(section, resolve=True) if section is not None else None
    options = S.resolve_options(section)
    view = {}
    for key in S.SETTINGS:
        value = OmegaConf.select(config, key, default=_ABSENT)
        if value is not _ABSENT:
            view[key] = value
    S.raise_problems(S.problems(view, options), "start-up check of the training config")
    exported = {S.ENV_LAM: repr(options.lam), S.ENV_ADVANTAGE: options.advantage}
    os.environ.update(exported)
    with open_dict(config):
        env_vars = OmegaConf.select(config, "ray_kwargs.ray_init.runtime_env.env_vars", default=None)
        if env_vars is None:
            OmegaConf.update(config, "ray_kwargs.ray_init.runtime_env.env_vars", exported, force_add=True)
        else:
            for k, v in exported.items():
                env_vars[k] = v
    return options


def install_driver_check() -> None:
    """Wrap ``verl.utils.config.validate_config`` so that it also runs ``check_config`` (idempotent)."""
    import verl.utils.config as verl_config

    original = verl_config.validate_config
    if getattr(original, "_gopd_check", False):
        return

    def validate_config(config, *args, **kwargs):
        result = original(config, *args, **kwargs)
        check_config(config)
        return result

    validate_config._gopd_check = True
    validate_config.__wrapped__ = original
    validate_config.__doc__ = original.__doc__
    verl_config.validate_config = validate_config
