"""Command line: ``gopd train | eval | demo | serve | experiment merge | lam-sweep | reward-correction``
(also ``python -m gopd``).

``torchrun --nproc_per_node=N -m gopd train --config FILE`` trains data parallel (gopd.distributed); the
other commands run in one process."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _add_config_args(p):
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (value parsed as YAML); repeatable")


def _add_serve_parser(sub):
    p = sub.add_parser("serve", help="serve a model's prompt log-probs over HTTP (a vLLM-compatible teacher)")
    p.add_argument("--model", required=True,
                   help="model spec, parsed as YAML: a path, 'smollm2' or '{tiny: {...}, seed: 1}'")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (the bound one is printed)")
    p.add_argument("--served-model-name", default=None, help="the name clients send as 'model'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-logprobs", type=int, default=20, help="the largest prompt_logprobs k accepted")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's max positions")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="prompt tokens per forward pass")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="after a request, wait this long for others to join its forward pass")


def _serve(args, model_error) -> int:
    import yaml

    from .serving.server import run

    try:
        spec = yaml.safe_load(args.model)
        run(spec, host=args.host, port=args.port, name=args.served_model_name, device=args.device,
            max_logprobs=args.max_logprobs, max_batch_tokens=args.max_batch_tokens,
            max_model_len=args.max_model_len, batch_wait_s=args.batch_wait_ms / 1000)
    except (model_error, yaml.YAMLError, OSError) as e:
        print(f"gopd: error: {e}", file=sys.stderr)
        return 2
    return 0


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
    _add_serve_parser(sub)
    p_exp = sub.add_parser("experiment", help="the paper's experiments in miniature")
    exp_sub = p_exp.add_subparsers(dest="experiment", required=True)
    p_merge = exp_sub.add_parser("merge", help="two SFT experts distilled back into the student: OPD vs ExOPD")
    _add_config_args(p_merge)
    p_merge.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sampling seeds (default: 0 1)")
    p_merge.add_argument("--out", default="results", help="folder for merge_<cpu|gpu>.json / .png (default: results)")
    p_merge.add_argument("--gpu", action="store_true",
                         help="the larger run for one CUDA GPU (2-digit questions, 512 held out per domain)")
    for name, text in (("lam-sweep", "the merge setting at several lam, with the power to tell ExOPD from OPD"),
                       ("reward-correction", "strong-to-weak ExOPD: reference = the student vs the experts' base")):
        p_x = exp_sub.add_parser(name, help=text)
        _add_config_args(p_x)
        p_x.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds (default: 0 1 2)")
        p_x.add_argument("--out", default="results", help="folder for the JSON / PNG (default: results)")
        p_x.add_argument("--gpu", action="store_true", help="the larger run for one CUDA GPU")
    args = parser.parse_args(argv)

    from . import config as config_mod
    from . import distributed
    from .data import DataError
    from .models import ModelError
    from .serving.served_teacher import ServedTeacherError

    if args.command == "serve":
        return _serve(args, ModelError)
    if args.command != "train" and distributed.launched_by_torchrun():
        print(f"gopd: error: `gopd {args.command}` runs in one process; only `gopd train` runs under torchrun "
              "(WORLD_SIZE > 1)", file=sys.stderr)
        return 2
    try:
        if args.command == "experiment" and args.experiment != "merge":
            from .experiments import lam_sweep, reward_correction

            run = {"lam-sweep": lam_sweep.main, "reward-correction": reward_correction.main}[args.experiment]
            run(list(sys.argv[1:] if argv is None else argv)[2:], args.config, tuple(args.overrides), args.seeds,
                args.out, args.gpu)
            return 0
        if args.command == "experiment":
            from .experiments.merge import main as merge_main

            merge_main(list(sys.argv[1:] if argv is None else argv)[2:], args.config, tuple(args.overrides),
                       args.seeds, args.out, args.gpu)
            return 0
        if args.command == "demo":
            from .experiments.demo import demo_config

            cfg = demo_config(args.config, tuple(args.overrides))
        else:
            cfg = config_mod.load(args.config, tuple(args.overrides))
        if args.command == "train":
            from .trainer import Trainer

            with distributed.process_group(cfg.device) as world:
                rows = Trainer(cfg, resume=args.resume).train()
            if world.is_main:
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
            from .experiments.demo import run_demo

            run_demo(cfg)
    except (config_mod.ConfigError, DataError, ModelError, ServedTeacherError) as e:
        print(f"gopd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
