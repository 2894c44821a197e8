"""Step time against the sharpness of the logits, CPU: where fp32 subnormals in the logit gradient appear.

A row whose logits spread over ~85 nats or more has columns with p ~ 1e-37; their gradient p * (...) is an
fp32 subnormal, and x86 GEMMs (MKL) that read subnormal inputs run on microcode assists. The CPU backend
writes such entries as 0 (csrc/cpu/rows_generic.h, zero_if_tiny); plain torch keeps them. This script scales
the heads' weights of bench_cpu.py's inputs by --scales (logit standard deviation ~ scale) and, per scale:

  subnormal_frac_eager / _gopd   fraction of the student's logit gradient that is an fp32 subnormal
                                 (gopd_loss's autograd on materialised fp32 logits: eager = the plain-torch
                                 reference, gopd = backend "cpu")
  gopd_cpu_s / eager_s           forward + backward of bench_cpu.py's variants (fused-linear, three heads,
                                 full mode), median of --repeats calls after one warm-up, same process

    python benchmarks/bench_sharp_logits.py             # N=512, V=49152, D=576, scales 1 8 14 20
    python benchmarks/bench_sharp_logits.py --quick     # tiny shapes, seconds (CI smoke)

Writes benchmarks/results/sharp_logits.json (sharp_logits_quick.json with --quick).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cpu  # noqa: E402  (shared inputs and step functions)
import harness  # noqa: E402


def subnormal_fraction(h, w, y, backend):
    """Fraction of d loss / d z_s that is a non-zero fp32 value below FLT_MIN."""
    import torch

    import gopd_kernels as gk

    zs = (h[0] @ w[0].t()).requires_grad_(True)
    with torch.no_grad():
        zt, zr = h[1] @ w[1].t(), h[2] @ w[2].t()
    gk.gopd_loss(zs, y, zt, zr, lam=bench_cpu.LAM, mode="full", backend=backend).loss.backward()
    g = zs.grad
    return float(((g != 0) & (g.abs() < torch.finfo(torch.float32).tiny)).double().mean())


def main(argv=None):
    parser = harness.parser(__doc__, quick_help="tiny shapes (N=64, V=4096, D=64), 1 repeat")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--v", type=int, default=49152)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 8.0, 14.0, 20.0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.v, args.d, args.repeats = 64, 4096, 64, 1

    h, w, y = bench_cpu._inputs(args.n, args.d, args.v)
    rows = []
    for scale in args.scales:
        ws = [x * scale for x in w]
        row = dict(scale=scale, logit_std=float((h[0][:64] @ ws[0].t()).std()),
                   subnormal_frac_eager=subnormal_fraction(h, ws, y, "torch"),
                   subnormal_frac_gopd=subnormal_fraction(h, ws, y, "cpu"))
        for variant in ("gopd_cpu", "eager"):
            timing = harness.timed(bench_cpu._step_fn(variant, "full", h, ws, y), args.repeats)
            row[f"{variant}_s"], row[f"{variant}_times_s"] = timing.median, timing.times
        rows.append(row)
        print(f"scale {scale:5.1f} (logit std {row['logit_std']:5.1f}): subnormal gradient entries "
              f"eager {row['subnormal_frac_eager']:.4f}, gopd {row['subnormal_frac_gopd']:.4f}; "
              f"step gopd_cpu {row['gopd_cpu_s']:.3f} s, eager {row['eager_s']:.3f} s", flush=True)
    result = dict(
        meta=dict(**harness.machine_meta(), n=args.n, v=args.v, d=args.d,
                  repeats=args.repeats, heads=3, dtype="float32", mode="full", lam=bench_cpu.LAM,
                  quick=args.quick),
        results=rows)
    harness.write_json(harness.out_path(args, "sharp_logits.json", "sharp_logits_quick.json"), result)
    return result


if __name__ == "__main__":
    main()
