"""Command line: ``gopd train | eval | demo`` (also ``python -m gopd``)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _add_config_args(p):
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (value parsed as YAML); repeatable")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gopd", description="Generalized On-Policy Distillation trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="run G-OPD training")
    _add_config_args(p_train)
    p_train.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p_eval = sub.add_parser("eval", help="pass@1 of the student (and teachers) on the eval set")
    _add_config_args(p_eval)
    p_demo = sub.add_parser("demo", help="OPD vs ExOPD on SmolLM2-135M-Instruct (the main job)")
    _add_config_args(p_demo)
    args = parser.parse_args(argv)

    from . import config as config_mod
    from .data import DataError
    from .models import ModelError

    try:
        if args.command == "demo":
            from .demo import demo_config

            cfg = demo_config(args.config, tuple(args.overrides))
        else:
            cfg = config_mod.load(args.config, tuple(args.overrides))
        if args.command == "train":
            from .trainer import Trainer

            rows = Trainer(cfg, resume=args.resume).train()
            print(json.dumps(rows[-1]))
        elif args.command == "eval":
            from .trainer import Trainer

            cfg.save_final_model = False
            # A separate folder, so evaluating never touches a training run's metrics or checkpoint.
            cfg.out_dir = os.path.join(cfg.out_dir, "eval")
            trainer = Trainer(cfg)
            result = dict(student=trainer.evaluate_student())
            if cfg.eval_teachers:
                result["teacher"] = trainer.evaluate_teachers()
            print(json.dumps(result))
        else:
            from .demo import run_demo

            run_demo(cfg)
    except (config_mod.ConfigError, DataError, ModelError) as e:
        print(f"gopd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
