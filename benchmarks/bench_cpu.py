"""CPU benchmark of the fused-linear G-OPD loss (forward + backward) at SmolLM2-135M head shapes.

Variants (each (variant, mode, N) runs in its own subprocess so its peak RSS is its own):
  gopd_cpu   gopd_kernels.fused_linear_gopd_loss(backend="cpu"): three heads (student, teacher,
             reference), chunked, never holds [N, V] logits.
  eager      plain torch: materialise the three [N, V] fp32 logits, gopd_kernels.reference.gopd_loss.
  liger_jsd  Liger's chunked fused-linear JSD (liger_kernel.chunked_loss, beta=1 = reverse KL), two
             heads only (student, teacher), full mode only; torch.compile on CPU.
  gemm       the GEMM floor: the five matmuls every fused-linear method does at least
             (three logit GEMMs, dH = G W, dW = G^T H), timed in the same run.
  gopd_cpu_bf16  gopd_cpu with the heads' H and W in bf16 (the logits are still fp32 GEMMs of the
             up-cast inputs); only when asked for with --variants.

Timing (benchmarks/harness.py): one warm-up call, then the median of --repeats calls of forward + backward;
--paired rotates the variants within one process. Memory: peak RSS
of the subprocess (ru_maxrss), and that peak minus the RSS after the inputs (incl. the trainable copies
of the student's hidden states and weight) were created ("extra").

    python benchmarks/bench_cpu.py                 # N in {512, 2048, 8192}, V=49152, D=576, fp32
    python benchmarks/bench_cpu.py --quick         # tiny shapes, a few seconds (CI smoke)

Writes JSON to benchmarks/results/cpu_bench.json (cpu_bench_quick.json with --quick) and, with
matplotlib installed, a plot of time and extra memory against N next to it (cpu_bench.png).
Eager torch is skipped (and the JSON says why) at an N whose [N, V] tensors would not fit in the
machine's available memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

VARIANTS = ("gopd_cpu", "eager", "liger_jsd", "gemm", "gopd_cpu_bf16")
DEFAULT_VARIANTS = VARIANTS[:4]
MODES = ("full", "sampled")
LAM = 1.25


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(n, d, v, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    h = [torch.randn(n, d, generator=g) for _ in range(3)]
    w = [torch.randn(v, d, generator=g) / d**0.5 for _ in range(3)]
    y = torch.randint(0, v, (n,), generator=g)
    return h, w, y


def _step_fn(variant, mode, h, w, y, chunk_size=None):
    """A zero-argument callable doing one forward + backward of `variant`."""
    import torch

    if variant == "gopd_cpu_bf16":
        h, w = [x.bfloat16() for x in h], [x.bfloat16() for x in w]
    hs = h[0].clone().requires_grad_(True)
    ws = w[0].clone().requires_grad_(True)

    if variant in ("gopd_cpu", "gopd_cpu_bf16"):
        import gopd_kernels as gk

        def step():
            out = gk.fused_linear_gopd_loss(hs, ws, y, h[1], w[1], h[2], w[2], lam=LAM, mode=mode, backend="cpu",
                                            chunk_size=chunk_size)
            out.loss.backward()
            hs.grad = ws.grad = None
        return step

    if variant == "eager":
        from gopd_kernels import reference as R

        def step():
            zs = hs @ ws.t()
            with torch.no_grad():
                zt, zr = h[1] @ w[1].t(), h[2] @ w[2].t()
            R.gopd_loss(zs, y, zt, zr, lam=LAM, mode=mode).loss.backward()
            hs.grad = ws.grad = None
        return step

    if variant == "liger_jsd":
        if mode != "full":
            return None  # Liger's JSD is a full-vocabulary divergence; it has no sampled mode
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0)

        def step():
            loss_fn(hs, ws, h[1], w[1], y).backward()
            hs.grad = ws.grad = None
        return step

    if variant == "gemm":
        n, v = h[0].shape[0], w[0].shape[0]
        grad = torch.randn(n, v)
        # Outputs preallocated and reused (as the fused path reuses its buffers), so the floor is the
        # matmuls alone, not page faults of fresh [N, V] outputs.
        logits = [torch.empty(n, v) for _ in range(3)]
        dh, dw = torch.empty(n, h[0].shape[1]), torch.empty(v, h[0].shape[1])

        def step():
            for i in range(3):
                torch.mm(h[i], w[i].t(), out=logits[i])
            torch.mm(grad, w[0], out=dh)
            torch.mm(grad.t(), h[0], out=dw)
        return step

    raise ValueError(variant)


def _chunk_of(variant, n, v, chunk_size):
    if variant != "gopd_cpu":
        return None
    import torch

    from gopd_kernels.api import default_chunk_size

    return chunk_size or default_chunk_size(n, v, 3, torch.device("cpu"))


def run_child(variant, mode, n, d, v, repeats, threads, chunk_size=None):
    import torch

    if threads:
        torch.set_num_threads(threads)
    h, w, y = _inputs(n, d, v)
    step = _step_fn(variant, mode, h, w, y, chunk_size)  # makes the trainable copies of H and W: inputs too
    base = _rss_mb()
    if step is None:
        return None
    timing = harness.timed(step, repeats)  # one warm-up (and torch.compile for Liger)
    times, warm = timing.times, timing.warmup_s
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    flops = 5 * 2 * n * d * v  # three logit GEMMs + dH + dW
    return dict(variant=variant, mode=mode, n=n, d=d, v=v, heads=2 if variant == "liger_jsd" else 3,
                median_s=statistics.median(times), times_s=times, warmup_s=warm, peak_rss_mb=peak,
                base_rss_mb=base, extra_rss_mb=peak - base, threads=torch.get_num_threads(),
                gemm_gflops=(flops / statistics.median(times) / 1e9) if variant == "gemm" else None,
                chunk_size=_chunk_of(variant, n, v, chunk_size))


def main(argv=None):
    p = harness.parser(__doc__, quick_help="tiny shapes (V=1024, D=64, N in {64, 256}), 1 repeat")
    p.add_argument("--n", type=int, nargs="+", default=None)
    p.add_argument("--v", type=int, default=49152)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every variant this many times in rotation (own process each) and report the median "
                        "of the rounds' medians: on a shared machine whose speed drifts, the ratios between "
                        "variants are then taken from interleaved runs")
    p.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                   help="timing only: all variants in ONE process, each run once per round in rotating order, "
                        "for ROUNDS rounds; the ratios to the GEMM floor and to Liger are taken per round (paired), "
                        "so drift of a shared machine cancels. No memory figures (the variants share a process).")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per variant subprocess")
    p.add_argument("--chunk-size", type=int, default=None, help="gopd_cpu tokens per chunk (default: the library's)")
    p.add_argument("--child", nargs=3, metavar=("VARIANT", "MODE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.quick:
        args.v, args.d = 1024, 64
        args.n = args.n or [64, 256]
        args.repeats = 1 if args.repeats == 3 else args.repeats
        if "liger_jsd" in args.variants and "--variants" not in (argv or sys.argv):
            args.variants = [x for x in args.variants if x != "liger_jsd"]  # torch.compile takes minutes
    args.n = args.n or [512, 2048, 8192]

    if args.paired:
        return run_paired(args)

    if args.child:
        variant, mode, n = args.child
        res = run_child(variant, mode, int(n), args.d, args.v, args.repeats, args.threads, args.chunk_size)
        print("RESULT " + json.dumps(res))
        return 0

    results = []
    for rnd in range(args.rounds):
        if args.rounds > 1:
            print(f"-- round {rnd + 1} of {args.rounds}", flush=True)
        for n in args.n:
            for mode in args.modes:
                for variant in args.variants:
                    if variant == "liger_jsd" and mode != "full":
                        continue
                    if variant == "gemm" and mode != args.modes[0]:
                        continue  # mode-independent
                    if variant == "eager" and not _fits_eager(n, args.v):
                        res = dict(variant=variant, mode=mode, n=n, error=(
                            f"skipped: eager needs about {_eager_bytes(n, args.v) / 2**30:.1f} GiB, "
                            f"{_mem_available() / 2**30:.1f} GiB available"))
                        results.append(res)
                        print(f"N={n:6d} {mode:8s} {variant:10s} {res['error']}", flush=True)
                        continue
                    cmd = [sys.executable, __file__, "--child", variant, mode, str(n), "--v", str(args.v), "--d",
                           str(args.d), "--repeats", str(args.repeats), "--threads", str(args.threads)]
                    if args.chunk_size:
                        cmd += ["--chunk-size", str(args.chunk_size)]
                    try:
                        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                        res = json.loads(line[-1][7:]) if line else dict(
                            variant=variant, mode=mode, n=n, error=(proc.stderr.strip().splitlines() or ["?"])[-1])
                    except subprocess.TimeoutExpired:
                        res = dict(variant=variant, mode=mode, n=n, error=f"timeout after {args.timeout}s")
                    if res is None:
                        continue
                    results.append(res)
                    if "error" in res:
                        print(f"N={n:6d} {mode:8s} {variant:10s} ERROR {res['error']}", flush=True)
                    else:
                        print(f"N={n:6d} {mode:8s} {variant:10s} {res['median_s'] * 1e3:10.1f} ms   "
                              f"peak RSS {res['peak_rss_mb']:8.0f} MiB (extra {res['extra_rss_mb']:7.0f})", flush=True)
    results = _merge_rounds(results)

    summary = _summary(results)
    for line in summary:
        print(line)

    out = harness.out_path(args, "cpu_bench.json", "cpu_bench_quick.json")
    meta = dict(**harness.machine_meta(), v=args.v, d=args.d, lam=LAM,
                repeats=args.repeats, rounds=args.rounds, dtype="float32",
                note="median of repeats after one warm-up (median over rounds with --rounds); fwd+bwd")
    harness.write_json(out, dict(meta=meta, results=results, summary=summary))
    png = _plot(results, out.with_suffix(".png"), meta)
    if png:
        print(f"wrote {png}")
    return 0


def run_paired(args):
    """--paired: per-round paired timings and ratios; JSON to cpu_bench_paired.json (or --out)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for n in args.n:
        h, w, y = _inputs(n, args.d, args.v)
        steps = {}
        for variant in args.variants:
            for mode in args.modes:
                if (variant == "liger_jsd" and mode != "full") or (variant == "gemm" and mode != args.modes[0]):
                    continue
                if variant == "eager" and not _fits_eager(n, args.v):
                    print(f"N={n} {variant} skipped: would not fit in memory", flush=True)
                    continue
                steps[(variant, mode)] = _step_fn(variant, mode, h, w, y, args.chunk_size)
        times = harness.paired(steps, args.paired)  # one warm-up each (and torch.compile for Liger)
        row = dict(n=n, d=args.d, v=args.v, rounds=args.paired, threads=torch.get_num_threads(),
                   chunk_size=_chunk_of("gopd_cpu", n, args.v, args.chunk_size),
                   times_s={f"{v}/{m}": t for (v, m), t in times.items()},
                   median_s={f"{v}/{m}": statistics.median(t) for (v, m), t in times.items()}, ratios={})
        for mode in args.modes:
            ours = times.get(("gopd_cpu", mode))
            for other, label in ((("gemm", args.modes[0]), "gemm_floor"), (("liger_jsd", "full"), "liger_jsd"),
                                 (("eager", mode), "eager"), (("gopd_cpu_bf16", mode), "gopd_cpu_bf16")):
                if ours is None or other not in times:
                    continue
                per_round = [a / b for a, b in zip(ours, times[other])]
                q = statistics.quantiles(per_round, n=4) if len(per_round) >= 2 else [per_round[0]] * 3
                row["ratios"][f"gopd_cpu/{mode} vs {label}"] = dict(
                    median=statistics.median(per_round), q1=q[0], q3=q[2], per_round=per_round)
                print(f"N={n} {mode}: gopd_cpu / {label}: median {statistics.median(per_round):.3f} "
                      f"(quartiles {q[0]:.3f}-{q[2]:.3f}, {len(per_round)} paired rounds)", flush=True)
        results.append(row)
        del steps
    out = harness.out_path(args, "cpu_bench_paired.json", "cpu_bench_paired_quick.json")
    meta = dict(**harness.machine_meta(), v=args.v, d=args.d, lam=LAM, dtype="float32",
                note="paired: all variants in one process after one warm-up each, run once per round in "
                     "rotating order; ratios per round; fwd+bwd; no memory figures")
    harness.write_json(out, dict(meta=meta, results=results))
    return 0


# Eager torch holds about 14 fp32 [N, V] tensors at its peak (three logits, their log-softmax, the
# loss's intermediates and gradients: 13.2 measured at N=2048, V=49152); it is skipped where that
# would not fit in 80% of the memory available when the benchmark starts.
_EAGER_NV_COPIES = 14


def _eager_bytes(n, v):
    return _EAGER_NV_COPIES * 4 * n * v


def _mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def _fits_eager(n, v):
    return _eager_bytes(n, v) <= 0.8 * _mem_available()


def _plot(results, path, meta):
    """Time and extra memory against N, one line per (variant, mode); None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in results if "error" not in r]
    if not ok:
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in VARIANTS:
        for mode in MODES:
            rows = sorted((r for r in ok if r["variant"] == variant and r["mode"] == mode), key=lambda r: r["n"])
            if not rows:
                continue
            label = variant if variant == "gemm" else f"{variant} ({mode})"
            style = "--" if variant == "gemm" else ("-" if mode == "full" else ":")
            ns = [r["n"] for r in rows]
            ax_t.plot(ns, [r["median_s"] for r in rows], style, marker="o", label=label)
            if variant != "gemm":
                ax_m.plot(ns, [r["extra_rss_mb"] for r in rows], style, marker="o", label=label)
    for ax, title in ((ax_t, "forward + backward time (s)"), (ax_m, "extra peak RSS (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(f"G-OPD fused-linear loss on CPU: V={meta['v']}, D={meta['d']}, fp32, three heads "
                 f"({meta['processor']}, {meta['cpu_count']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _merge_rounds(results):
    """One row per (variant, mode, n): median over rounds of median_s (the per-round medians kept in
    round_medians_s) and of the memory figures; a variant that failed in any round keeps its error."""
    groups = {}
    for r in results:
        groups.setdefault((r["variant"], r["mode"], r["n"]), []).append(r)
    merged = []
    for rows in groups.values():
        ok = [r for r in rows if "error" not in r]
        if len(ok) < len(rows) or len(rows) == 1:
            merged.append(rows[0] if len(ok) == len(rows) else next(r for r in rows if "error" in r))
            continue
        row = dict(ok[0])
        for key in ("median_s", "peak_rss_mb", "base_rss_mb", "extra_rss_mb"):
            row[key] = statistics.median(r[key] for r in ok)
        row["round_medians_s"] = [r["median_s"] for r in ok]
        row["times_s"] = [t for r in ok for t in r["times_s"]]
        if row.get("gemm_gflops") is not None:
            row["gemm_gflops"] = statistics.median(r["gemm_gflops"] for r in ok)
        merged.append(row)
    return merged


def _summary(results):
    """Ratios the CPU goals are stated in (time against eager and the GEMM floor, memory), per (N, mode)."""
    ok = [r for r in results if "error" not in r]
    key = {(r["variant"], r["mode"], r["n"]): r for r in ok}
    gemm = {r["n"]: r for r in ok if r["variant"] == "gemm"}
    lines = []
    for (variant, mode, n), r in sorted(key.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        if variant != "gopd_cpu":
            continue
        parts = [f"N={n} {mode}: gopd_cpu {r['median_s'] * 1e3:.1f} ms"]
        e = key.get(("eager", mode, n))
        if e:
            parts.append(f"{r['median_s'] / e['median_s']:.2f}x eager time, "
                         f"{r['extra_rss_mb'] / max(e['extra_rss_mb'], 1e-9):.1%} of eager's extra memory")
        if n in gemm:
            parts.append(f"{r['median_s'] / gemm[n]['median_s']:.2f}x the GEMM floor")
        lg = key.get(("liger_jsd", mode, n))
        if lg:
            parts.append(f"{r['median_s'] / lg['median_s']:.2f}x Liger two-head JSD time")
        lines.append("; ".join(parts))
    for mode in MODES:
        rows = sorted((r for r in ok if r["variant"] == "gopd_cpu" and r["mode"] == mode), key=lambda r: r["n"])
        if len(rows) >= 2 and rows[-1]["n"] > rows[0]["n"]:
            slope = (rows[-1]["extra_rss_mb"] - rows[0]["extra_rss_mb"]) / (rows[-1]["n"] - rows[0]["n"])
            lines.append(f"gopd_cpu {mode}: extra memory slope {slope * 1024:.2f} MiB per 1024 tokens "
                         f"(N={rows[0]['n']}..{rows[-1]['n']})")
    return lines


if __name__ == "__main__":
    sys.exit(main())
