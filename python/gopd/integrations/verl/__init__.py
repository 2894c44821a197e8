"""G-OPD in verl (written against verl 0.9.1): the distillation losses ``gopd`` and ``gopd_topk``.

Install ``pip install .[verl]`` next to verl; verl imports this package through its ``verl.plugins``
entry point on ``import verl``, in the driver and in every Ray worker. Importing it:
    - registers ``gopd`` (sampled, any lam) and ``gopd_topk`` (top-k, lam = 1) with
      ``verl.trainer.distillation.losses.register_distillation_loss`` (see ``.losses`` for the math);
    - routes verl's top-k loss computation to gopd's for ``loss_mode=gopd_topk``;
    - wraps verl's config validation so that the driver checks, at start-up, every verl setting G-OPD
      needs and stops with the setting to change (``.startup``, ``.settings``).

Use: ``distillation.distillation_loss.loss_mode=gopd`` plus ``+gopd.lam=1.25`` (or the environment
variable GOPD_LAM), and ``+gopd.advantage=old`` for the authors' off-policy convention
(docs/scaling.md, examples/verl_gopd.sh).

verl logs a plug-in's import error at debug level only, so this package prints its own failure to stderr
before re-raising it: a run whose log has that message has no gopd losses.
"""

from __future__ import annotations

import sys
import traceback

TESTED_VERL = "0.9.1"


def _load() -> None:
    import verl

    from . import losses, startup

    losses.install_topk_route()
    startup.install_driver_check()
    version = getattr(verl, "__version__", "?")
    if version != TESTED_VERL:
        print(f"gopd verl plug-in: written and tested against verl {TESTED_VERL}, running on verl {version}; "
              "it relies on verl's distillation-loss registry and top-k loss hook", file=sys.stderr)


try:
    from .settings import ENV_ADVANTAGE, ENV_LAM, LOSS_NAMES, GOPDVerlConfigError, Options

    _load()
except Exception:
    print("gopd verl plug-in: FAILED to load, the losses gopd / gopd_topk are not registered:\n"
          + traceback.format_exc(), file=sys.stderr, flush=True)
    raise

__all__ = ["LOSS_NAMES", "ENV_LAM", "ENV_ADVANTAGE", "Options", "GOPDVerlConfigError", "TESTED_VERL"]
