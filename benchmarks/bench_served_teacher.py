"""Trainer step time and bytes on the wire: a served top-k teacher (`gopd serve` on loopback, mode topk) against
the co-located teacher in full mode.

Variants, each a few `Trainer.train_step` calls on the same config and seed (the same first batch; later
batches differ as the modes update the student differently):
  colocated/full   the teacher loaded in the trainer's process, mode full (all V log-probs, nothing on the wire)
  served/topk-k    the same teacher behind `gopd serve` (a separate process on 127.0.0.1), mode topk with k ids
                   per position; bytes = request + response bodies the client sent / received per step
Reported per variant: the median step time over --steps steps after one warm-up step, and bytes per step and per
response token. The server shares this machine's CPU cores with the trainer, so on a small CPU the served
teacher's forward pass competes with the student's: the point of serving is a teacher on other hardware.

    python benchmarks/bench_served_teacher.py                 # SmolLM2-135M student and teacher, k = 20, 100
    python benchmarks/bench_served_teacher.py --quick         # tiny random Llamas, k = 4, 8 (CI smoke)

Writes JSON to benchmarks/results/served_teacher.json (served_teacher_quick.json with --quick).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = harness.ROOT
TINY_T = {"tiny": {"hidden_size": 48, "num_hidden_layers": 1}, "seed": 1}
TINY_S = {"tiny": {"hidden_size": 32, "num_hidden_layers": 2}, "seed": 0}


def start_server(spec, max_logprobs: int, threads: int, timeout: float = 600):
    """`gopd serve` on a free loopback port; returns (process, url)."""
    from gopd.serving import process as serve_process

    return serve_process.launch(["--model", json.dumps(spec), "--max-logprobs", str(max_logprobs)], timeout,
                                env=dict(os.environ, OMP_NUM_THREADS=str(threads)))


def stop(proc):
    from gopd.serving import process as serve_process

    serve_process.stop(proc, 15)


def run_variant(name, base: dict, teacher, mode: str, steps: int) -> dict:
    from gopd import config as config_mod
    from gopd.serving.served_teacher import ServedTeacher
    from gopd.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = config_mod.load(None, (), base=dict(base, teacher=teacher, mode=mode, out_dir=out))
        trainer = Trainer(cfg)
        client = trainer.default_teacher if isinstance(trainer.default_teacher, ServedTeacher) else None
        times, tokens, wire = [], [], []
        for i in range(steps + 1):
            sent0 = (client.bytes_sent + client.bytes_received) if client else 0
            t0 = time.perf_counter()
            row = trainer.train_step()
            dt = time.perf_counter() - t0
            if i:   # the first step is a warm-up
                times.append(dt)
                tokens.append(row["n_tokens"])
                wire.append(((client.bytes_sent + client.bytes_received) if client else 0) - sent0)
        return dict(variant=name, mode=mode, step_s=statistics.median(times), step_times_s=times,
                    tokens_per_step=statistics.mean(tokens), bytes_per_step=statistics.mean(wire),
                    bytes_per_token=sum(wire) / max(1, sum(tokens)), loss_last=row["loss"])


def main(argv=None) -> int:
    ap = harness.parser(__doc__, quick_help="tiny random models, k = 4 and 8 (seconds)")
    ap.add_argument("--k", type=int, nargs="+", default=None, help="top-k sizes (default 20 100; quick 4 8)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant after a warm-up")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--server-threads", type=int, default=1,
                    help="torch threads of the server process (it shares the CPU with the trainer)")
    args = ap.parse_args(argv)
    harness.use_checkout()

    student, teacher = (TINY_S, TINY_T) if args.quick else ("smollm2", "smollm2")
    ks = args.k or ([4, 8] if args.quick else [20, 100])
    steps = args.steps or (2 if args.quick else 3)
    base = dict(student=student, lam=1.0, n_train=32, n_eval=2, eval_at_start=False, eval_teachers=False,
                batch_size=args.batch_size or 4, micro_batch_size=args.batch_size or 4,
                max_new_tokens=args.max_new_tokens or (8 if args.quick else 32), steps=steps + 1, lr=1e-5,
                save_final_model=False, progress=False, seed=0)
    rows = [run_variant("colocated/full", base, teacher, "full", steps)]
    proc, url = start_server(teacher, max(ks), args.server_threads)
    try:
        for k in ks:
            rows.append(run_variant(f"served/topk-{k}", dict(base, top_k=k), dict(url=url, top_k=k), "topk", steps))
    finally:
        stop(proc)
    summary = [f"{r['variant']:>16}: {r['step_s']:.3f} s/step, {r['bytes_per_step'] / 1024:.1f} KiB/step "
               f"({r['bytes_per_token']:.0f} B/token)" for r in rows]
    result = dict(meta=dict(**harness.machine_meta(), student=student, teacher=teacher, quick=args.quick),
                  config=base, rows=rows, summary=summary)
    print("\n".join(summary))
    harness.write_json(harness.out_path(args, "served_teacher.json", "served_teacher_quick.json"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
