"""A short sweep of the Triton kernels' launch parameters and of the implementations, for the per-device
table that `backend="auto"` and the kernels read (gopd_kernels/tuning.py).

Swept at the Qwen3-4B head shapes (V = 151936, D = 2560, bf16 heads; N = 2048 and 8192), each kernel's
defaults first, then the candidates below:
  rows_forward / rows_backward  the row kernels on fp32 [chunk, V] logits of three models, as the chunked
                                fused-linear path launches them (chunk = the library's default on this GPU),
                                and on bf16 [N, V] logits (gopd_loss on materialised logits)
  onchip_forward                one head (forward-only scoring) and three heads
  onchip_backward               three heads in full mode (lam = 1.25) and the student alone (sampled mode)
A candidate is timed only after two checks: at a small ragged shape (N, V, D multiples of no tile) against
the float64 truth (the torch backend on float64 logits of the same inputs: error at most 4x the defaults'
own, or 1e-5), and at the timed shape against the defaults' result (1e-3, relative). A launch that fails
(no such configuration, out of registers or shared memory) is recorded with its error.
Before the sweep, the CUDA backend is timed beside Triton (the chunked path, three heads, full mode, each at
its defaults); after each N's sweep, the implementations: the chunked fused-linear path against the on-chip
one (at its best tiles) for forward + backward of three heads in full and in sampled mode and for
forward-only scoring of one head.

The table entry for this device (and torch / triton version) holds: `backend` (cuda where it beat triton at
every N), `impl` per shape class and use (the faster of chunked / onchip), and `tiles` where a candidate beat
the defaults by more than MARGIN (else the defaults stay: no entry).

    python benchmarks/autotune.py --out OUT/autotune.json --table OUT/tuning.json [--quick] [--seconds 120]
    python benchmarks/autotune.py --tiny --out ... --table ...   # any machine: tiny shapes (the interpreter on CPU)

--table writes the table in use with this device's entry replaced by the one measured (copy that file to
gopd_kernels/tuning.json to commit it). --seconds: no candidate starts after that many seconds; what was
measured is still written. --quick: N = 8192 only, three candidates per kernel, neither the bf16 logit-level
row kernels nor the sampled-mode backward. Without a GPU --tiny is implied: two candidates per kernel at tiny
shapes (no logit-level row kernels); the numbers mean nothing, the run checks that every path works
(`make gpu-check --dry-run`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

harness.use_checkout()

import triton  # noqa: E402

import gopd_kernels as gk  # noqa: E402
from gopd_kernels import backends, tuning  # noqa: E402
from gopd_kernels.api import default_chunk_size  # noqa: E402
from gopd_kernels.backends import torch as torch_backend  # noqa: E402
from gopd_kernels.triton import onchip, rows  # noqa: E402

IGNORE = -100
LAM = 1.25
MARGIN = 0.03  # a candidate must beat the defaults by more than this to enter the table (timing noise)
V, D, NS = 151936, 2560, (2048, 8192)


def _t(bn, bv, bd, warps, stages=None):
    cfg = dict(block_n=bn, block_v=bv, block_d=bd, num_warps=warps)
    return cfg if stages is None else dict(cfg, num_stages=stages)


# {} is the kernel's defaults. Row kernels: the forward keeps eleven lane states per column live, so it
# wants about 4 columns per thread (1024 columns x 8 warps: 80 registers, 8 per thread took 177, by ptxas
# on sm_90); the backward is light and streams. On-chip kernels: at the default 64 x 128 x 64 tiles with 8
# warps both use all 255 registers and spill (forward 824 bytes, backward 1524); 64 x 64 x 32 with 8 warps
# is the largest forward tile without spills (236 registers). Smaller token blocks also give the forward more
# programs: N / 64 = 32 at N = 2048, a quarter of an H100 / H200's SMs.
CANDIDATES = {
    "rows_forward": [{}, dict(block_v=512, num_warps=4), dict(block_v=1024, num_warps=4),
                     dict(block_v=2048, num_warps=8), dict(block_v=2048, num_warps=16)],
    "rows_backward": [{}, dict(block_v=2048, num_warps=4), dict(block_v=2048, num_warps=8),
                      dict(block_v=4096, num_warps=16), dict(block_v=8192, num_warps=16)],
    "onchip_forward": [{}, _t(64, 64, 32, 8), _t(32, 64, 32, 4), _t(32, 128, 32, 8), _t(64, 64, 32, 4),
                       _t(16, 128, 64, 4), _t(64, 64, 32, 8, 2), _t(128, 64, 32, 8, 2)],
    "onchip_backward": [{}, _t(64, 64, 32, 8), _t(32, 128, 32, 8), _t(64, 128, 32, 8, 2), _t(32, 64, 64, 4),
                        _t(128, 64, 32, 8, 2)],
}
TINY_CANDIDATES = {
    "rows_forward": [{}, dict(block_v=16, num_warps=2, num_stages=2)],
    "rows_backward": [{}, dict(block_v=16, num_warps=1)],
    "onchip_forward": [{}, _t(16, 16, 16, 2, 2)],
    "onchip_backward": [{}, _t(16, 16, 16, 1)],
}


def rel_err(got, want, per_row=False):
    """Normwise relative error (inf where `got` is not finite); per_row: the worst row, each row's norm
    floored at sqrt(its length) (the statistics' rows are O(1) to O(10) per entry)."""
    # fp32 norms: the errors judged are >= 1e-6, and a float64 copy of [N, V] logits would not fit
    got, want = [x.float() for x in got], [x.float() for x in want]
    err = 0.0
    for a, b in zip(got, want):
        if not torch.isfinite(a).all():
            return math.inf
        pairs = zip(a, b) if per_row else [(a, b)]
        for x, y in pairs:
            floor = math.sqrt(y.numel()) if per_row else 1e-30
            err = max(err, float((x - y).norm() / max(float(y.norm()), floor)))
    return err


class Problem:
    """One kernel at one shape: its inputs, a runner taking launch parameters, and the truth."""

    def __init__(self, kernel, dtype, models, n, v, d, device, seed=0, exact_stats=False):
        self.kernel, self.dtype, self.models, self.n, self.v, self.d = kernel, dtype, models, n, v, d
        g = torch.Generator(device=device).manual_seed(seed)
        self.y = torch.randint(0, v, (n,), generator=g, device=device)
        self.y[::17] = IGNORE
        self.g_lp = torch.randn(n, generator=g, device=device, dtype=torch.float64)
        self.g_loss = (torch.rand(n, generator=g, device=device, dtype=torch.float64) + 0.5) if models > 1 else \
            torch.zeros(n, device=device, dtype=torch.float64)  # one model: sampled mode (no full-mode term)
        if kernel.startswith("rows"):  # logits of `models` models, std ~4
            self.z = [(torch.randn(n, v, generator=g, device=device) * 4).to(dtype) for _ in range(models)]
            self.z += [None] * (3 - models)
        else:  # hidden states and heads
            self.h = [torch.randn(n, d, generator=g, device=device).to(dtype) for _ in range(models)] + \
                     [None] * (3 - models)
            self.w = [(torch.randn(v, d, generator=g, device=device) * (4 / d ** 0.5)).to(dtype)
                      for _ in range(models)] + [None] * (3 - models)
        self.stats = None
        if kernel.endswith("backward"):  # the statistics the backward is given: the float64 truth's at the
            # small shape, the forward kernel's (defaults) at the timed one (float64 logits would not fit)
            if exact_stats:
                self.stats = torch_backend.rows_forward(*self._logits64(), self.y, 1.0, 1.0, 1.0, IGNORE)
            elif kernel == "rows_backward":
                self.stats = rows.rows_forward(*self.z, self.y, 1.0, 1.0, 1.0, IGNORE)
            else:
                heads = [x for pair in zip(self.h, self.w) for x in pair]
                self.stats = onchip.onchip_forward(*heads, self.y, 1.0, 1.0, 1.0, IGNORE)[0]

    @property
    def shape_class(self):
        return tuning.shape_class(self.dtype, self.models, self.n)

    def _logits64(self):
        if self.kernel.startswith("rows"):
            return [None if z is None else z.double() for z in self.z]
        return [None if h is None else h.double() @ w.double().T for h, w in zip(self.h, self.w)]

    def run(self, cfg):
        """The kernel's outputs (a tuple) launched with `cfg` ({} = its defaults)."""
        if self.kernel == "rows_forward":
            with tuning.forced({"rows_forward": cfg} if cfg else {}):
                return (rows.rows_forward(*self.z, self.y, 1.0, 1.0, 1.0, IGNORE),)
        if self.kernel == "rows_backward":
            with tuning.forced({"rows_backward": cfg} if cfg else {}):
                out = torch.empty_like(self.z[0])
                return (rows.rows_backward(*self.z, self.y, self.stats, self.g_lp, self.g_loss, LAM, 1.0, 1.0, 1.0,
                                           IGNORE, out),)
        heads = [x for pair in zip(self.h, self.w) for x in pair]
        if self.kernel == "onchip_forward":
            return (onchip.onchip_forward(*heads, self.y, 1.0, 1.0, 1.0, IGNORE, blocks=cfg or None)[0],)
        return onchip.onchip_backward(*heads, self.y, self.stats, self.g_lp, self.g_loss, LAM, 1.0, 1.0, 1.0, IGNORE,
                                      need_full=self.models > 1, blocks=cfg or None)

    def truth(self):
        """The same outputs from the torch backend on float64 logits."""
        z = self._logits64()
        if self.kernel == "rows_forward" or self.kernel == "onchip_forward":
            return (torch_backend.rows_forward(*z, self.y, 1.0, 1.0, 1.0, IGNORE),)
        dz = torch_backend.rows_backward(*z, self.y, self.stats, self.g_lp, self.g_loss, LAM, 1.0, 1.0, 1.0, IGNORE,
                                         torch.empty_like(z[0]))
        if self.kernel == "rows_backward":
            return (dz,)
        return dz @ self.w[0].double(), dz.T @ self.h[0].double()


class Sweep:
    """The candidates, the winners and the implementation timings of one run; each step's tensors are
    released (and the CUDA cache emptied) when it returns, before the next one allocates its own."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        # Candidates stop at 70% of the time: the implementation timings that decide `impl` and `backend`
        # (a few forward + backward calls each) keep the rest.
        start = time.monotonic()
        self.sweep_deadline, self.deadline = start + 0.7 * args.seconds, start + args.seconds
        self.candidates, self.winners, self.impl, self.backend_rows = [], {}, [], []
        self.cands = TINY_CANDIDATES if args.tiny else {k: (c[:3] if args.quick else c) for k, c in CANDIDATES.items()}

    def time(self, fn):
        """Seconds per call: do_bench's median on a GPU; one call under the interpreter (plumbing only)."""
        return harness.timed(fn, 1, warmup=0).median if self.args.tiny else harness.bench(fn, 1, rep_ms=100)

    def out_of_time(self, sweeping=True):
        return time.monotonic() > (self.sweep_deadline if sweeping else self.deadline)

    def kernel(self, *args):
        self._kernel(*args)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def implementations(self, *args, **kw):
        self._implementations(*args, **kw)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _kernel(self, kernel, dtype, models, n, v, d, small):
        """Checks and times every candidate of `kernel` at one shape; records them and the winner."""
        cands = self.cands[kernel]
        if self.out_of_time():
            self.candidates.append(dict(kernel=kernel, n=n, skipped="out of time"))
            return
        # The small ragged shape: no dimension a multiple of any tile, and at least two tiles of the largest.
        big = {k: max([c.get(k, 16) for c in cands] + [16]) for k in ("block_n", "block_v", "block_d")}
        default_v = rows._FWD_BLOCK if kernel == "rows_forward" else rows._BWD_BLOCK
        sv = 2 * max(big["block_v"], default_v if kernel.startswith("rows") else onchip.BLOCKS["block_v"]) + 37
        sn = 2 * max(big["block_n"], 16 if kernel.startswith("rows") else onchip.BLOCKS["block_n"]) + 5
        sd = 2 * max(big["block_d"], onchip.BLOCKS["block_d"]) + 13
        if small:
            sv, sn, sd = min(sv, v), min(sn, n), min(sd, d)
        check = Problem(kernel, dtype, models, sn, sv, sd, self.device, seed=1, exact_stats=True)
        truth = check.truth()
        timed = Problem(kernel, dtype, models, n, v, d, self.device)
        base_small = base_timed = None
        results = []
        for cfg in cands:
            rec = dict(kernel=kernel, shape_class=timed.shape_class, n=n, v=v, d=d, tiles=cfg)
            self.candidates.append(rec)
            results.append(rec)
            if self.out_of_time():
                rec["skipped"] = "out of time"
                continue
            try:
                err = rel_err(check.run(cfg), truth, per_row=kernel.endswith("forward"))
                if base_small is None:
                    base_small = err
                rec["err_small"] = err
                if not err <= max(4 * base_small, 1e-5):
                    rec["error"] = f"wrong at N={sn}, V={sv}, D={sd}: error {err:.2e} (defaults {base_small:.2e})"
                    continue
                out = timed.run(cfg)
                if base_timed is None:
                    base_timed = out
                err = rel_err(out, base_timed, per_row=kernel.endswith("forward"))
                rec["err_vs_defaults"] = err
                del out
                if not err <= 1e-3:
                    rec["error"] = f"differs from the defaults at the timed shape: {err:.2e}"
                    continue
                rec["seconds"] = self.time(lambda: timed.run(cfg))
            except Exception as exc:  # a configuration the compiler or the device refuses
                rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"  {kernel:16s} {timed.shape_class:18s} {str(cfg or 'defaults'):70s} "
                  + (f"{rec['seconds'] * 1e3:9.3f} ms" if "seconds" in rec else rec.get("error", "")[:80]), flush=True)
        ok = [r for r in results if "seconds" in r]
        default = next((r for r in results if not r["tiles"] and "seconds" in r), None)
        if ok:
            best = min(ok, key=lambda r: r["seconds"])
            self.winners.setdefault(kernel, {})[results[0]["shape_class"]] = dict(
                tiles=best["tiles"], seconds=best["seconds"],
                default_seconds=None if default is None else default["seconds"],
                speedup=None if default is None else default["seconds"] / best["seconds"])

    def best_tiles(self, kernel, cls):
        return (self.winners.get(kernel, {}).get(cls) or {}).get("tiles") or {}

    def _implementations(self, n, v, d, backends_only=False):
        """Chunked against on-chip (train_full, train_sampled, score) at one N, or (backends_only) the CUDA
        backend beside Triton: the chunked path, three heads, full mode, each backend at its defaults."""
        if self.out_of_time(sweeping=False):
            (self.backend_rows if backends_only else self.impl).append(dict(n=n, skipped="out of time"))
            return
        dtype = torch.bfloat16
        g = torch.Generator(device=self.device).manual_seed(2)
        h = [torch.randn(n, d, generator=g, device=self.device).to(dtype) for _ in range(3)]
        w = [(torch.randn(v, d, generator=g, device=self.device) * (4 / d ** 0.5)).to(dtype) for _ in range(3)]
        y = torch.randint(0, v, (n,), generator=g, device=self.device)
        y[::17] = IGNORE
        hs, ws = h[0].detach().requires_grad_(True), w[0].detach().requires_grad_(True)
        c3, c1 = tuning.shape_class(dtype, 3, n), tuning.shape_class(dtype, 1, n)
        fwd3, fwd1 = self.best_tiles("onchip_forward", c3), self.best_tiles("onchip_forward", c1)
        # The chunked path at the row kernels' best tiles for its [chunk, V] fp32 logits of three models.
        c_rows = tuning.shape_class(torch.float32, 3, self.chunk)
        rows_best = {k: self.best_tiles(k, c_rows) for k in ("rows_forward", "rows_backward")}

        def train(backend, mode, impl="chunked"):
            def step():
                out = gk.fused_linear_gopd_loss(hs, ws, y, h[1], w[1], h[2], w[2], lam=LAM, mode=mode, backend=backend,
                                                impl=impl)
                out.loss.backward()
                hs.grad = ws.grad = None
                return float(out.loss.detach())
            return step

        def score(backend, impl="chunked"):
            def step():
                with torch.no_grad():
                    return float(gk.fused_linear_logprobs(h[1], w[1], y, backend=backend, impl=impl).sum())
            return step

        if backends_only:
            return self._backends(n, c3, train)
        forced_tiles = {
            "train_full": {"onchip_forward": fwd3, "onchip_backward": self.best_tiles("onchip_backward", c3),
                           **rows_best},
            "train_sampled": {"onchip_forward": fwd3, "onchip_backward": self.best_tiles("onchip_backward", c1),
                              **rows_best},
            "score": {"onchip_forward": fwd1}}
        for use, cls in (("train_full", c3), ("train_sampled", c3), ("score", c1)):
            rec = dict(n=n, use=use, shape_class=cls, tiles=forced_tiles[use])
            self.impl.append(rec)
            if self.out_of_time(sweeping=False):
                rec["skipped"] = "out of time"
                continue
            mode = "sampled" if use == "train_sampled" else "full"
            for impl in ("chunked", "onchip"):
                fn = score("triton", impl) if use == "score" else train("triton", mode, impl)
                try:
                    with tuning.forced({k: t for k, t in forced_tiles[use].items() if t}):
                        rec[f"{impl}_loss"] = fn()
                        rec[f"{impl}_s"] = self.time(fn)
                except Exception as exc:
                    rec[f"{impl}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            a, b = rec.get("chunked_loss"), rec.get("onchip_loss")
            if a is not None and b is not None and not math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3):
                rec["onchip_error"] = f"loss {b} against the chunked path's {a}"
                rec.pop("onchip_s", None)
            print(f"  impl {use:14s} N={n:5d}: chunked {rec.get('chunked_s', float('nan')) * 1e3:9.2f} ms, "
                  f"onchip {rec.get('onchip_s', float('nan')) * 1e3:9.2f} ms", flush=True)

    def _backends(self, n, c3, train):
        rec = dict(n=n, shape_class=c3)
        self.backend_rows.append(rec)
        for backend in ("triton", "cuda"):
            if not backends.is_available(backend) or (backend == "cuda" and self.device.type != "cuda"):
                rec[f"{backend}_error"] = "not available here"
                continue
            try:
                fn = train(backend, "full")
                rec[f"{backend}_loss"] = fn()
                rec[f"{backend}_s"] = self.time(fn)
            except Exception as exc:
                rec[f"{backend}_error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"  backend N={n:5d}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in rec.items() if k.endswith("_s")),
              flush=True)

    def entry(self):
        """This device's table entry from what was measured."""
        tiles = {}
        for kernel, by_class in self.winners.items():
            for cls, win in by_class.items():
                if win["tiles"] and win["speedup"] is not None and win["speedup"] > 1 + MARGIN:
                    tiles.setdefault(kernel, {})[cls] = win["tiles"]
        impl = {}
        for rec in self.impl:
            if rec.get("chunked_s") and rec.get("onchip_s"):
                wins = rec["onchip_s"] < rec["chunked_s"] * (1 - MARGIN)
                impl.setdefault(rec["shape_class"], {})[rec["use"]] = "onchip" if wins else "chunked"
        e = dict(device=tuning.device_name(self.device), torch=torch.__version__, triton=triton.__version__,
                 measured=time.strftime("%Y-%m-%d") + " by benchmarks/autotune.py", impl=impl, tiles=tiles)
        timed = [r for r in self.backend_rows if r.get("triton_s")]
        if timed:
            cuda_wins = all(r.get("cuda_s") and r["cuda_s"] < r["triton_s"] * (1 - MARGIN) for r in timed)
            e["backend"] = "cuda" if cuda_wins else "triton"
        return e


def main(argv=None):
    p = harness.parser(__doc__, quick_help="N = 8192 only, three candidates per kernel, fewer kernels")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (implied without a GPU): checks every path")
    p.add_argument("--seconds", type=float, default=150.0, help="no candidate starts after this many seconds")
    p.add_argument("--table", type=Path, default=None, help="write the table with this device's entry here")
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    args.tiny = args.tiny or not on_gpu
    device = torch.device("cuda" if on_gpu else "cpu")
    started = time.monotonic()
    sweep = Sweep(args, device)
    if args.tiny:
        v, d, ns, chunk, small = 40, 16, (8,), 4, True
    else:
        v, d, ns, small = V, D, NS[-1:] if args.quick else NS, False
        chunk = default_chunk_size(max(ns), v, 3, device)
    sweep.chunk = chunk
    print(f"autotune on {tuning.device_name(device)}: V={v}, D={d}, N in {list(ns)}, row-kernel chunk {chunk}, "
          f"{args.seconds:.0f} s", flush=True)
    meta = harness.device_meta()
    out = harness.out_path(args, "autotune.json", "autotune_quick.json")

    def save():
        """The results so far, and the table from them: written after every stage, so a run stopped by
        its step's timeout still leaves what it measured."""
        entry = sweep.entry()
        result = dict(meta=meta, tiny=args.tiny, quick=args.quick, seconds_budget=args.seconds,
                      seconds=round(time.monotonic() - started, 1), v=v, d=d, ns=list(ns), chunk=chunk, margin=MARGIN,
                      timer="triton.testing.do_bench median" if on_gpu else
                      "perf_counter under TRITON_INTERPRET=1 (not a performance number)",
                      candidates=sweep.candidates, winners=sweep.winners, impl=sweep.impl, backends=sweep.backend_rows,
                      entry=entry, table=None)
        if args.table:
            result["table"] = str(tuning.write(args.table, tuning.with_entry(tuning.load(), entry)))
        harness.write_json(out, result)

    # The CUDA backend beside Triton first (never timed on a GPU before), then the largest N first, so that
    # a run cut short by its time still decides the goal's shape: the chunked path's row kernels, the on-chip
    # kernels, then the choice between the implementations at that N.
    stages = [("backends", None, None, n) for n in sorted(ns, reverse=True)]
    stages += [("rows_forward", torch.float32, 3, chunk), ("rows_backward", torch.float32, 3, chunk)]
    for n in sorted(ns, reverse=True):
        stages += [("onchip_forward", torch.bfloat16, 1, n), ("onchip_forward", torch.bfloat16, 3, n),
                   ("onchip_backward", torch.bfloat16, 3, n)]
        stages += [] if args.quick else [("onchip_backward", torch.bfloat16, 1, n)]
        stages.append(("implementations", None, None, n))
    if not (args.quick or args.tiny):  # the logit-level path: bf16 [N, V] logits
        stages += [(k, torch.bfloat16, 3, n) for n in ns for k in ("rows_forward", "rows_backward")]
    for kernel, dtype, models, n in stages:
        if kernel in ("implementations", "backends"):
            sweep.implementations(n, v, d, backends_only=kernel == "backends")
        else:
            sweep.kernel(kernel, dtype, models, n, v, d, small)
        save()
    entry = sweep.entry()
    print(f"wrote the table {args.table} (entry for {entry['device']}, torch {entry['torch']}, "
          f"triton {entry['triton']})" if args.table else "no --table: nothing written but the JSON")
    return 0


if __name__ == "__main__":
    sys.exit(main())
