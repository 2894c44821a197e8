"""What every benchmark script shares: the timers, the machine's metadata, the JSON writer, the common options.

Timers (seconds; fn runs the whole thing being measured, e.g. one forward + backward):
  timed(fn, repeats)    `warmup` untimed calls (compiles, first-touch), then the median of `repeats` calls
                        by the wall clock (time.perf_counter)
  paired(fns, rounds)   every fn of a dict once per round, in an order rotated by one each round, so the
                        drift of a shared machine hits every variant alike; per-fn lists of times
  gpu_median(fn)        on a CUDA device: triton.testing.do_bench's median (it synchronises and flushes the L2)
  bench(fn, repeats)    gpu_median on a CUDA machine, else the median of timed()

Metadata: machine_meta() (CPU, threads, torch, python; every JSON's `meta`), device_meta() (adds the GPU and
the CUDA / triton versions where there is one). write_json(path, data) writes one result file.
parser(doc) is an ArgumentParser with the options every script takes: --quick (tiny shapes, seconds: the
tests run it so the scripts do not rot) and --out (the JSON's path; default benchmarks/results/NAME).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def use_checkout():
    """Import gopd_kernels / gopd from this checkout (the scripts run as files, not as installed modules)."""
    for path in (ROOT / "python", ROOT):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


class Timing(NamedTuple):
    median: float
    times: list
    warmup_s: float


def timed(fn, repeats: int, warmup: int = 1) -> Timing:
    """`warmup` untimed calls, then the median of `repeats` timed calls of fn()."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), times, warm)


def paired(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """name -> [seconds per round]: each fn warmed up, then run once per round in rotating order."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    keys = list(fns)
    times = {k: [] for k in keys}
    for rnd in range(rounds):
        shift = rnd % len(keys) if keys else 0
        for k in keys[shift:] + keys[:shift]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def gpu_median(fn, warmup_ms: float = 5, rep_ms: float = 200) -> float:
    """Median seconds of fn() on the current CUDA device (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") / 1e3


def bench(fn, repeats: int, rep_ms: float = 200) -> float:
    """gpu_median where CUDA is available, else the median of `repeats` timed calls after one warm-up."""
    import torch

    if torch.cuda.is_available():
        return gpu_median(fn, rep_ms=rep_ms)
    return timed(fn, repeats).median


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_meta() -> dict:
    """Where a benchmark ran: torch, python, the CPU and the threads torch uses."""
    import torch

    return dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                processor=_cpu_name(), cpu_count=os.cpu_count(), threads=torch.get_num_threads())


def device_meta() -> dict:
    """machine_meta, plus the GPU (name, capability, memory) and the CUDA and triton versions where present."""
    import torch

    meta = machine_meta()
    meta["gpu"] = torch.cuda.is_available()
    if meta["gpu"]:
        props = torch.cuda.get_device_properties(0)
        meta.update(device=torch.cuda.get_device_name(), capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        meta["device"] = f"cpu ({meta['processor'] or platform.machine()})"
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    return meta


def parser(doc: str, *, quick_help: str = "tiny shapes, seconds (CI smoke)") -> argparse.ArgumentParser:
    """An ArgumentParser with the options every benchmark takes: --quick and --out."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, default=None, help="output JSON (default: benchmarks/results/...)")
    return p


def out_path(args, name: str, quick_name: str | None = None) -> Path:
    """--out, else benchmarks/results/NAME (QUICK_NAME with --quick: quick results are not committed)."""
    if args.out:
        return Path(args.out)
    return RESULTS / (quick_name if args.quick and quick_name else name)


def write_json(path, data, *, indent: int = 1, newline: bool = True) -> Path:
    """Writes one result file (parents created) and says where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + ("\n" if newline else ""))
    print(f"wrote {path}")
    return path
