"""Forward+backward time and peak memory of the G-OPD loss: triton vs torch vs torch.compile vs Liger.

Variants (full mode by default, --modes full,sampled for both; lam = 1.25 with three heads, lam = 1 =
reverse KL with two heads; Liger's JSD has no sampled mode and is timed in full mode only):
  logits/triton        gopd_loss on materialised [N, V] logits, backend="triton" (logit-level kernel);
                       its effective bandwidth (3 logit reads + 1 gradient write) is compared with the
                       device's copy bandwidth measured in the same run.
  fused/triton-3h      fused_linear_gopd_loss, backend="triton", student + teacher + reference heads
  fused/onchip-3h      the same with impl="onchip" (logit tiles kept on chip)
  fused/triton-2h      the same with student + teacher only (lam = 1), Liger's setting
  eager/torch-3h       logits = (h @ W.T).float() per head, then gopd_kernels.reference.gopd_loss
  compile/torch-3h     torch.compile of that eager function
  liger/jsd-2h         Liger's LigerFusedLinearJSDLoss(beta=1, soft loss only), student + teacher heads
  floor/gemm-3h, -2h   the GEMMs alone (forward logits of every head, dH and dW of the student) timed in
                       the same run: the time no fused-linear loss can beat.
Forward only (scoring one head without gradient, as a teacher or reference is scored; timed once per shape):
  score/triton-1h      fused_linear_logprobs under no_grad, backend="triton" (chunked logits)
  score/onchip-1h      the same, impl="onchip": where keeping logits on chip can pay, since the
                       forward alone needs no recompute (fwd + bwd recomputes the tiles: docs/design.md §5.6)
  score/torch-1h       log_softmax of (h @ W.T).float(), gathered at the targets
  score/onchip-1h@BNxBVxBD  the on-chip forward kernel alone at other tiles than its default
  floor/gemm-1h-fwd    the one GEMM h @ W.T

Each row also records the loss value as a sanity check. Variants with the same heads agree up to
the rounding of the logits: the fused-linear kernels compute fp32 logits from bf16 inputs, while
eager / compile / Liger / logits-level round the logits to bf16 first (|dz| ~ 4e-3 |z|).

Shapes: Qwen3-4B-like (V=151936, D=2560, N in {2048, 8192, 16384}) and SmolLM2-135M-like (V=49152,
D=576), bf16. On a CUDA GPU times are medians of triton.testing.do_bench and memory is the peak
allocated above the inputs. Without a GPU, ``--quick`` runs tiny shapes through Triton's interpreter
with a plain timer (numbers meaningless, it only keeps the script from rotting) and memory is not
measured. A variant that runs out of memory is recorded as such. Results go to
benchmarks/results/loss_<device>.json.

    python benchmarks/bench_loss.py            # GPU, full sweep
    python benchmarks/bench_loss.py --quick    # tiny shapes, CPU interpreter or GPU
    python benchmarks/bench_loss.py --shapes qwen3-4b:2048,qwen3-4b:8192 --modes full,sampled
    python benchmarks/bench_loss.py ... --dry-run   # parse and print the plan, run nothing (any machine)
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

harness.use_checkout()

import triton  # noqa: E402

import gopd_kernels as gk  # noqa: E402
from gopd_kernels import reference as R  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
LAM = 1.25

MODELS = {"qwen3-4b": (151936, 2560), "smollm2-135m": (49152, 576)}  # name -> (V, D)
FULL_SHAPES = [("qwen3-4b", n, 151936, 2560) for n in (2048, 8192, 16384)] + \
              [("smollm2-135m", n, 49152, 576) for n in (2048, 8192, 16384)]
QUICK_SHAPES = [("tiny", 16, 300, 32), ("tiny", 24, 1000, 48)]
VARIANT_GROUPS = ("triton", "eager", "compile", "liger", "floor")
MODES = ("full", "sampled")


def parse_shapes(text):
    """"qwen3-4b:2048,qwen3-4b:8192" -> [(model, N, V, D)]; a model is a name of MODELS or "name=V:D"."""
    shapes = []
    for item in text.split(","):
        model, _, n = item.strip().rpartition(":")
        name, _, vd = model.partition("=")
        if vd:
            v, _, d = vd.partition(":")
            MODELS[name] = (int(v), int(d))
        if name not in MODELS or not n.isdigit():
            raise ValueError(f"--shapes: expected MODEL:N with MODEL in {sorted(MODELS)}, got {item!r}")
        shapes.append((name, int(n), *MODELS[name]))
    return shapes


def device_name():
    return torch.cuda.get_device_name() if ON_GPU else f"cpu ({platform.processor() or platform.machine()})"


def peak_extra_bytes(fn):
    """(peak allocated memory above what was allocated before fn() (GPU only, else None), fn())."""
    if not ON_GPU:
        return None, fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, result


def copy_bandwidth(nbytes):
    """Device copy bandwidth (bytes read + written per second) on a buffer of nbytes."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEVICE)
    dst = torch.empty_like(src)
    t = harness.bench(lambda: dst.copy_(src), 5)
    return 2 * src.numel() * 2 / t


def make_inputs(n, v, d, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=DEVICE, dtype=torch.float32) * scale).to(dtype)

    h = [rnd(n, d) for _ in range(3)]
    w = [rnd(v, d, scale=d ** -0.5 * 4) for _ in range(3)]  # logits of std ~4
    y = torch.randint(0, v, (n,), generator=g, device=DEVICE)
    y[::17] = -100
    return h, w, y


def _backward(loss, *params):
    """Backward, then drop the gradients so that the next call's peak memory counts them again."""
    loss.backward()
    for p in params:
        p.grad = None
    return loss.detach()


def eager_loss(hs, ws, ht, wt, hr, wr, y, mode="full"):
    """What a user writes without fused kernels: fp32 logits for every head, then the loss."""
    zs = (hs @ ws.T).float()
    zt = (ht @ wt.T).float()
    zr = None if hr is None else (hr @ wr.T).float()
    return R.gopd_loss(zs, y, zt, zr, lam=LAM if zr is not None else 1.0, mode=mode).loss


# Tiles (tokens x vocabulary x hidden) the on-chip forward is also timed at; the default is onchip.BLOCKS.
ONCHIP_TILES = [(64, 64, 32), (64, 128, 32), (128, 64, 32)]


def _onchip_tiles(h, w, y, bn, bv, bd):
    from gopd_kernels.triton import onchip

    def score():
        stats, _ = onchip.onchip_forward(h, w, None, None, None, None, y, 1.0, 1.0, 1.0, -100,
                                         blocks=dict(block_n=bn, block_v=bv, block_d=bd))
        return stats[3].sum()  # the row contract's lp_s
    return score


def _scorer(h, w, y, backend, impl="chunked"):
    """Forward only: the sum of one head's target log-probs, with a fused backend or (None) eager torch."""
    def score():
        with torch.no_grad():
            if backend is None:
                lp = torch.log_softmax((h @ w.T).float(), -1).gather(-1, y.clamp(min=0)[:, None])[:, 0]
                return torch.where(y == -100, 0.0, lp).sum()
            return gk.fused_linear_logprobs(h, w, y, backend=backend, impl=impl).sum()
    return score


def variants(h, w, y, n, v, d, which, mode="full", with_floor=True):
    """name -> (callable running forward + backward, or forward alone for score/*, extra facts), or a
    zero-argument factory of that. The GEMM floor and the forward-only scoring do not depend on the mode:
    with_floor=False leaves them out (timed for one mode only)."""
    hs = h[0].detach().requires_grad_(True)
    ws = w[0].detach().requires_grad_(True)
    ht, wt, hr, wr = h[1], w[1], h[2], w[2]
    out = {}

    if "triton" in which:
        def fused3():
            out3 = gk.fused_linear_gopd_loss(hs, ws, y, ht, wt, hr, wr, lam=LAM, mode=mode, backend="triton",
                                             impl="chunked")
            return _backward(out3.loss, hs, ws)

        def fused2():
            out2 = gk.fused_linear_gopd_loss(hs, ws, y, ht, wt, lam=1.0, mode=mode, backend="triton", impl="chunked")
            return _backward(out2.loss, hs, ws)

        def onchip3():
            out3 = gk.fused_linear_gopd_loss(hs, ws, y, ht, wt, hr, wr, lam=LAM, mode=mode, backend="triton",
                                             impl="onchip")
            return _backward(out3.loss, hs, ws)

        out["fused/triton-3h"] = (fused3, {})
        out["fused/triton-2h"] = (fused2, {})
        out["fused/onchip-3h"] = (onchip3, {})
        if with_floor:  # forward-only scoring does not depend on the mode either
            for impl, name in (("chunked", "triton"), ("onchip", "onchip")):
                out[f"score/{name}-1h"] = (_scorer(ht, wt, y, "triton", impl), {})
            for bn, bv, bd in ONCHIP_TILES:  # the on-chip forward kernel alone at other tiles (not tuned yet)
                out[f"score/onchip-1h@{bn}x{bv}x{bd}"] = (_onchip_tiles(ht, wt, y, bn, bv, bd), {})

        def logits_variant():
            # Logit-level kernel on materialised bf16 logits, built only when this variant runs so
            # the [N, V] tensors do not sit in memory while the other variants are measured.
            with torch.no_grad():
                zs0, zt, zr = [(a @ b.T) for a, b in zip(h, w)]
            zs = zs0.requires_grad_(True)

            def logits():
                return _backward(gk.gopd_loss(zs, y, zt, zr, lam=LAM, mode=mode, backend="triton").loss, zs)

            return logits, {"bytes_moved": 4 * n * v * zs.element_size()}

        out["logits/triton"] = logits_variant

    if "eager" in which or "compile" in which:
        def eager():
            return _backward(eager_loss(hs, ws, ht, wt, hr, wr, y, mode), hs, ws)

        if "eager" in which:
            out["eager/torch-3h"] = (eager, {})
            if with_floor:
                out["score/torch-1h"] = (_scorer(ht, wt, y, None), {})
        if "compile" in which:
            compiled = torch.compile(eager_loss)

            def comp():
                    return _backward(compiled(hs, ws, ht, wt, hr, wr, y, mode), hs, ws)

            out["compile/torch-3h"] = (comp, {})

    if "liger" in which and mode == "full":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        except ImportError as exc:
            out["liger/jsd-2h"] = (None, {"error": f"liger-kernel not importable: {exc}"})
        else:
            # beta = 1 is the reverse KL KL(p_s || p_t), i.e. our full mode at lam = 1 with two heads.
            liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0,
                                            compiled=ON_GPU)

            def liger_fn():
                    return _backward(liger(hs, ws, ht, wt, y), hs, ws)

            out["liger/jsd-2h"] = (liger_fn, {})

    if "floor" in which and with_floor:
        def gemms(heads):
            def run():
                g = None
                for a, b in zip(h[:heads], w[:heads]):
                    z = a @ b.T
                    g = z if g is None else g
                g @ w[0]          # dH
                g.T @ h[0]        # dW
            return run

        flops_per_head = 2 * n * v * d
        out["floor/gemm-3h"] = (gemms(3), {"flops": flops_per_head * 5})
        out["floor/gemm-2h"] = (gemms(2), {"flops": flops_per_head * 4})
        out["floor/gemm-1h-fwd"] = (lambda: (h[1] @ w[1].T, None)[1], {"flops": flops_per_head})
    return out


def run(shapes, which, reps, dtype, modes=("full",)):
    rows = []
    for model, n, v, d in shapes:
        torch.manual_seed(0)
        try:
            h, w, y = make_inputs(n, v, d, dtype)
        except torch.OutOfMemoryError:
            rows.append(dict(model=model, n=n, v=v, d=d, error="OOM allocating inputs"))
            continue
        specs = [(mode, name, spec) for mode in modes
                 for name, spec in variants(h, w, y, n, v, d, which, mode, with_floor=mode == modes[0]).items()]
        for mode, name, spec in specs:
            row = dict(model=model, variant=name, mode=mode, n=n, v=v, d=d, dtype=str(dtype).replace("torch.", ""))
            try:
                fn, facts = spec() if callable(spec) else spec
            except torch.OutOfMemoryError:
                fn, facts = None, {"error": "OOM preparing inputs"}
            if fn is None:
                row.update(facts, seconds=None)
                rows.append(row)
                continue
            try:
                seconds = harness.bench(fn, reps)
                peak, loss = peak_extra_bytes(fn)
            except torch.OutOfMemoryError:
                row.update(seconds=None, error="OOM")
                if ON_GPU:
                    torch.cuda.empty_cache()
            except Exception as exc:  # one broken variant must not cost the rest of a GPU lease's numbers
                row.update(seconds=None, error=f"{type(exc).__name__}: {exc}"[:400])
                print(json.dumps(row), flush=True)
                rows.append(row)
                continue
            else:
                row.update(seconds=seconds, peak_extra_mib=None if peak is None else round(peak / 2 ** 20, 1))
                if loss is not None:  # same value across variants with the same heads: a sanity check
                    row["loss"] = float(loss)
                if "flops" in facts:
                    row["tflops_per_s"] = facts["flops"] / seconds / 1e12
                if "bytes_moved" in facts:
                    row["effective_gb_per_s"] = facts["bytes_moved"] / seconds / 1e9
            rows.append(row)
            print(json.dumps(row), flush=True)
            fn = spec = facts = None  # free this variant's buffers before the next one
            if ON_GPU:
                torch.cuda.empty_cache()
        del h, w, y
        if ON_GPU:
            torch.cuda.empty_cache()
    return rows


def summarize(rows, copy_gb_per_s):
    """Per shape, the ratios the performance goals are stated in (None where a variant is missing)."""
    by_shape = {}
    floors = {}
    for r in rows:
        if r.get("seconds"):
            by_shape.setdefault((r["model"], r["n"], r["v"], r["d"], r.get("mode", "full")), {})[r["variant"]] = r
            if r["variant"].startswith("floor/"):
                floors.setdefault((r["model"], r["n"], r["v"], r["d"]), {})[r["variant"]] = r
    for key, got in by_shape.items():  # the GEMM floor (timed once per shape) serves every mode
        for name, r in floors.get(key[:4], {}).items():
            got.setdefault(name, r)

    def ratio(a, b):
        return a["seconds"] / b["seconds"] if a and b else None

    out = []
    for (model, n, v, d, mode), got in by_shape.items():
        if set(got) <= set(floors.get((model, n, v, d), {})) and len(by_shape) > 1:
            continue  # a mode whose only rows are the floor's
        logits = got.get("logits/triton")
        out.append(dict(
            model=model, n=n, v=v, d=d, mode=mode,
            fused3h_over_gemm_floor=ratio(got.get("fused/triton-3h"), got.get("floor/gemm-3h")),
            onchip3h_over_fused3h=ratio(got.get("fused/onchip-3h"), got.get("fused/triton-3h")),
            liger2h_over_fused2h=ratio(got.get("liger/jsd-2h"), got.get("fused/triton-2h")),
            eager3h_over_fused3h=ratio(got.get("eager/torch-3h"), got.get("fused/triton-3h")),
            compile3h_over_fused3h=ratio(got.get("compile/torch-3h"), got.get("fused/triton-3h")),
            score_onchip_over_chunked=ratio(got.get("score/onchip-1h"), got.get("score/triton-1h")),
            score_chunked_over_gemm=ratio(got.get("score/triton-1h"), got.get("floor/gemm-1h-fwd")),
            score_onchip_ms_by_tile={name.partition("@")[2] or "default": r["seconds"] * 1e3
                                     for name, r in got.items() if name.startswith("score/onchip-1h")} or None,
            logits_bandwidth_fraction_of_copy=(logits["effective_gb_per_s"] / copy_gb_per_s
                                               if logits and copy_gb_per_s else None)))
    return out


def main(argv=None):
    p = harness.parser(__doc__, quick_help="tiny shapes (the only option without a GPU)")
    p.add_argument("--variants", default="triton,eager,compile,liger,floor",
                   help="comma list of: triton, eager, compile, liger, floor")
    p.add_argument("--reps", type=int, default=3, help="timer repetitions without a GPU")
    p.add_argument("--shapes", default=None,
                   help=f"comma list of MODEL:N, MODEL in {sorted(MODELS)} or NAME=V:D (default: the full sweep)")
    p.add_argument("--modes", default="full", help="comma list of: full, sampled")
    p.add_argument("--dry-run", action="store_true",
                   help="check the arguments and print the plan as JSON; run nothing (any machine)")
    args = p.parse_args(argv)
    which = set(args.variants.split(","))
    modes = args.modes.split(",")
    if not which <= set(VARIANT_GROUPS):
        p.error(f"--variants: unknown {sorted(which - set(VARIANT_GROUPS))}; expected some of {VARIANT_GROUPS}")
    if not set(modes) <= set(MODES) or not modes:
        p.error(f"--modes: expected some of {MODES}, got {args.modes!r}")
    try:
        shapes = parse_shapes(args.shapes) if args.shapes else (QUICK_SHAPES if args.quick else FULL_SHAPES)
    except ValueError as exc:
        p.error(str(exc))
    if args.dry_run:
        print(json.dumps(dict(plan="bench_loss", shapes=shapes, variants=sorted(which), modes=modes,
                              gpu=ON_GPU, out=None if args.out is None else str(args.out))))
        return
    if not ON_GPU and not args.quick:
        p.error("no CUDA GPU: only --quick runs here (tiny shapes under the Triton interpreter)")
    dtype = torch.bfloat16

    result = dict(device=device_name(), gpu=ON_GPU, quick=args.quick, torch=torch.__version__,
                  triton=triton.__version__, lam=LAM, timer="triton.testing.do_bench median"
                  if ON_GPU else "perf_counter median under TRITON_INTERPRET=1 (not a performance number)",
                  meta=harness.device_meta(), rows=[])
    if ON_GPU:
        result["copy_gb_per_s"] = copy_bandwidth(1 << 30) / 1e9
    result["modes"] = modes
    result["rows"] = run(shapes, which, args.reps, dtype, modes)
    result["summary"] = summarize(result["rows"], result.get("copy_gb_per_s"))
    print(json.dumps(result["summary"], indent=1))

    tag = "quick_" if args.quick else ""
    tag += re.sub(r"[^a-z0-9]+", "_", (torch.cuda.get_device_name() if ON_GPU else "cpu").lower()).strip("_")
    harness.write_json(harness.out_path(args, f"loss_{tag}.json"), result)


if __name__ == "__main__":
    main()
