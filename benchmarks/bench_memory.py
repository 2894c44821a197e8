"""Peak memory of one forward+backward of the G-OPD loss, each variant in its own process.

Variants: `fused-<backend>` (gk.fused_linear_gopd_loss: chunked, no [N, V] logits) and `eager`
(materialised logits of three heads + gopd_kernels.reference). Peak = the process's peak RSS after
the step minus its RSS after the inputs were made (CPU). Writes benchmarks/results/memory_<device>.json.

    python benchmarks/bench_memory.py                      # SmolLM2 shapes, N in {512, 2048, 8192}
    python benchmarks/bench_memory.py --quick              # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one(variant: str, n: int, v: int, d: int, mode: str) -> dict:
    import torch

    import gopd_kernels as gk
    from gopd_kernels import reference

    torch.manual_seed(0)
    heads = [(torch.randn(n, d) * 0.5, torch.randn(v, d) * 0.05) for _ in range(3)]
    y = torch.randint(0, v, (n,))
    hs, ws = (x.clone().requires_grad_(True) for x in heads[0])
    base = rss_now_mib()
    done = {}

    def step():
        if variant == "eager":
            out = reference.gopd_loss(hs @ ws.T, y, heads[1][0] @ heads[1][1].T, heads[2][0] @ heads[2][1].T,
                                      lam=1.25, mode=mode)
        else:
            out = gk.fused_linear_gopd_loss(hs, ws, y, *heads[1], *heads[2], lam=1.25, mode=mode,
                                            backend=variant.split("-", 1)[1])
        out.loss.backward()
        done["loss"] = float(out.loss)

    seconds = harness.timed(step, 1, warmup=0).median  # the first call: its peak is the one measured
    return dict(variant=variant, n=n, v=v, d=d, mode=mode, peak_extra_mib=round(rss_peak_mib() - base, 1),
                seconds=round(seconds, 3), loss=done["loss"])


def main():
    parser = harness.parser(__doc__, quick_help="tiny shapes (V=512, D=64, N in {64, 256}), seconds")
    parser.add_argument("--variants", default="fused-torch,eager")
    parser.add_argument("--mode", default="full")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        variant, n, v, d = args.one.split(":")
        print(json.dumps(one(variant, int(n), int(v), int(d), args.mode)))
        return
    v, d, ns = (512, 64, [64, 256]) if args.quick else (49152, 576, [512, 2048, 8192])
    rows = []
    for n in ns:
        for variant in args.variants.split(","):
            if variant == "eager" and n * v > 2**27:
                print(f"eager        N={n:6d}: skipped (its [N, V] logits would not fit this machine comfortably)")
                continue
            cmd = [sys.executable, __file__, "--one", f"{variant}:{n}:{v}:{d}", "--mode", args.mode]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{variant} N={n}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{variant:12s} N={n:6d} V={v} D={d} {args.mode}: peak extra {row['peak_extra_mib']:9.1f} MiB"
                  f"  ({row['seconds']:.2f} s, not a timing benchmark)")
    harness.write_json(harness.out_path(args, "memory_cpu.json", "memory_quick.json"),
                       dict(device=platform.processor() or platform.machine(), meta=harness.machine_meta(), rows=rows))


if __name__ == "__main__":
    main()
