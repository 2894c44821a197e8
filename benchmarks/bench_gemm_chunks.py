"""What chunking over tokens costs the logit GEMMs on CPU: the fixed cost per GEMM call.

The fused-linear path computes each head's logits chunk by chunk (`hidden[chunk] @ W.T`), so at N tokens
and chunk C it makes N / C calls per head where the GEMM floor makes one. Each call streams (and packs)
all of W, [V, D], whatever C is, so a call costs about  t(C) = a + b C  with a fixed `a`. This script
times the three heads' logit GEMMs at SmolLM2-135M shapes for several chunk sizes (each variant run
once per round in rotating order, median over rounds), fits a and b per call by least squares, and
reports what the chunking adds at each chunk size relative to one call per head.

    python benchmarks/bench_gemm_chunks.py                      # N=2048, C in {256, 512, 1024, 2048}
    python benchmarks/bench_gemm_chunks.py --quick              # tiny shapes, seconds (CI smoke)

Writes benchmarks/results/gemm_chunks.json (gemm_chunks_quick.json with --quick).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def measure(n, d, v, chunks, rounds, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    h = [torch.randn(n, d, generator=g) for _ in range(3)]
    w = [torch.randn(v, d, generator=g) / d**0.5 for _ in range(3)]
    outs = {c: [torch.empty(min(c, n), v) for _ in range(3)] for c in chunks}

    def run(c):
        """The three heads' logits of all N tokens, chunk by chunk."""
        for start in range(0, n, c):
            rows = slice(start, min(n, start + c))
            m = rows.stop - rows.start
            for i in range(3):
                torch.mm(h[i][rows], w[i].t(), out=outs[c][i][:m])

    # The warm-up call of each chunk size first-touches its outputs and MKL's buffers.
    return harness.paired({c: (lambda c=c: run(c)) for c in chunks}, rounds)


def fit_per_call(n, chunks, median_s):
    """Least-squares a, b of t_call(C) = a + b C from the per-call times (3 heads x ceil(N / C) calls)."""
    xs, ys = [], []
    for c in chunks:
        calls = 3 * -(-n // c)
        xs.append(min(c, n))
        ys.append(median_s[c] / calls)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def main(argv=None):
    parser = harness.parser(__doc__, quick_help="tiny shapes (N=256, V=4096, D=64), 3 rounds")
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--v", type=int, default=49152)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.v, args.d, args.chunks, args.rounds = 256, 4096, 64, [64, 128, 256], 3

    chunks = sorted(set(args.chunks))
    times = measure(args.n, args.d, args.v, chunks, args.rounds)
    median_s = {c: statistics.median(t) for c, t in times.items()}
    a, b = fit_per_call(args.n, chunks, median_s)
    one_call = median_s[max(chunks)] if max(chunks) >= args.n else None
    rows = []
    for c in chunks:
        calls = 3 * -(-args.n // c)
        row = dict(chunk=c, calls=calls, median_s=median_s[c], times_s=times[c],
                   fixed_cost_s=calls * a, over_one_call=(median_s[c] / one_call) if one_call else None)
        rows.append(row)
        extra = f", {row['over_one_call']:.2f}x one call per head" if one_call else ""
        print(f"chunk {c:5d}: {calls:3d} calls, {median_s[c]:.3f} s{extra}")
    print(f"per call: {a * 1e3:.1f} ms fixed + {b * 1e6:.1f} us per token (least squares over {len(chunks)} chunk sizes)")
    result = dict(
        meta=dict(**harness.machine_meta(), n=args.n, v=args.v, d=args.d,
                  rounds=args.rounds, heads=3, dtype="float32"),
        fit=dict(fixed_per_call_s=a, per_token_s=b), results=rows)
    harness.write_json(harness.out_path(args, "gemm_chunks.json", "gemm_chunks_quick.json"), result)
    return result


if __name__ == "__main__":
    main()
