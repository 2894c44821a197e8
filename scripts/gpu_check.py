"""One command that proves gopd on a CUDA machine: build, GPU tests, GPU benchmark, a short table.

    python3 scripts/gpu_check.py OUT_DIR [--quick] [--wheels DIR] [--dry-run]      (or: make gpu-check OUT=DIR)

Written for a fresh GPU machine that has torch, triton, nvcc, cmake, ninja, pytest and hypothesis but no
internet and no copy of our venv. Steps, each a subprocess with its own time limit, logged to
OUT_DIR/gpu_check.log:

  env     the device, driver, torch / CUDA / triton / nvcc versions
  wheels  (--wheels DIR) extra wheels (Liger-Kernel, say) installed with pip --no-index into OUT_DIR/site,
          which then goes on PYTHONPATH; a missing or broken wheel folder only drops the variants that need it
  build   the extension with its CUDA kernels against this machine's torch, in place
          (setup.py build_ext --inplace, GOPD_BUILD_CUDA=1, TORCH_CUDA_ARCH_LIST = this GPU's capability)
  tests   the kernel tests natively on the GPU (the files in GPU_TESTS: the Triton and CUDA backends, the
          backend contract, the public API's errors, logits and fused-linear, fp32 / bf16 / fp16)
  bench   benchmarks/bench_loss.py at Qwen3 shapes (V=151936, D=2560, bf16, N in {2048, 8192}, full and
          sampled) against eager torch, torch.compile of the reference, Liger's chunked JSD (when importable)
          and the GEMM floor of the same run, plus the copy bandwidth

Everything lands in OUT_DIR (at most six files: gpu_check.json with the device name and each step's status
and seconds, gpu_check.log, tests.xml, loss.json, and the wheels' site folder); the table is printed last.
--quick runs a subset meant to fit in 3 minutes (N=2048 only, the Triton and CUDA backend tests only); the full run is meant
to fit in 8 minutes on an H100. --dry-run runs on any machine (CI runs it): it checks that every file a
step uses exists, every Python file compiles, the benchmark's and pytest's arguments parse and the tests
collect, and prints the commands it would run, without building or running anything on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Kernel tests that run natively when a GPU is present (they use CUDA tensors where torch sees one).
GPU_TESTS = ["tests/test_triton_backend.py", "tests/test_cuda_backend.py", "tests/test_backends.py",
             "tests/test_errors.py", "tests/test_mixed_precision.py", "tests/test_compile.py"]
BENCH = "benchmarks/bench_loss.py"
# Seconds each step may take: the whole run stays under 8 minutes (3 with --quick) on an H100.
LIMITS = {"env": 60, "wheels": 60, "build": 240, "tests": 150, "bench": 270}
QUICK_LIMITS = {"env": 60, "wheels": 60, "build": 240, "tests": 60, "bench": 90}


def gpu_capability() -> str | None:
    """'9.0' for an H100 / H200, from torch; None without a visible GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def plan(out: Path, quick: bool, wheels: Path | None) -> list[dict]:
    """The steps as {name, cmd, env} dicts: the one place that says what a GPU check runs."""
    py = sys.executable
    site = out / "site"
    env_code = ("import json, platform, torch, triton; "
                "print(json.dumps(dict(python=platform.python_version(), torch=torch.__version__, "
                "cuda=torch.version.cuda, triton=triton.__version__, gpu=torch.cuda.is_available(), "
                "device=torch.cuda.get_device_name() if torch.cuda.is_available() else None, "
                "capability=torch.cuda.get_device_capability() if torch.cuda.is_available() else None)))")
    steps = [dict(name="env", cmd=[py, "-c", env_code]),
             dict(name="env-tools", cmd=["bash", "-c", "nvidia-smi -L; nvcc --version | tail -n 2; "
                                                       "cmake --version | head -n 1; ninja --version"])]
    found = sorted(wheels.glob("*.whl")) if wheels is not None else []
    if found:
        steps.append(dict(name="wheels", cmd=[py, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                              "--no-compile", "--target", str(site),
                                              *map(str, found)]))
    cap = gpu_capability() or "9.0"
    steps.append(dict(name="build", cmd=[py, "setup.py", "-q", "build_ext", "--inplace"],
                      env={"GOPD_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": cap,
                           "GOPD_CUDA_ARCHS": cap.replace(".", ""), "MAX_JOBS": str(os.cpu_count() or 4)}))
    test_cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={out / 'tests.xml'}",
                "-o", "junit_family=xunit2", *(GPU_TESTS[:2] if quick else GPU_TESTS)]
    steps.append(dict(name="tests", cmd=test_cmd))
    bench_cmd = [py, BENCH, "--model", "qwen3-4b", "--n", *(["2048"] if quick else ["2048", "8192"]),
                 "--modes", "full,sampled", "--variants", "triton,cuda,eager,compile,liger,floor",
                 "--out", str(out / "loss.json")]
    steps.append(dict(name="bench", cmd=bench_cmd))
    return steps


def run_step(step: dict, log, limit: float, pythonpath: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath, **step.get("env", {}))
    log.write(f"\n===== {step['name']}: {' '.join(step['cmd'])}\n")
    log.flush()
    t0 = time.time()
    try:
        proc = subprocess.run(step["cmd"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=limit)
        text, rc = proc.stdout, proc.returncode
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        status = f"timed out after {limit:.0f} s"
    seconds = time.time() - t0
    log.write(text)
    log.write(f"\n===== {step['name']}: {status} in {seconds:.1f} s\n")
    log.flush()
    tail = "\n".join(text.strip().splitlines()[-3:])
    print(f"[gpu-check] {step['name']}: {status} in {seconds:.1f} s" + (f"\n{tail}" if status != "ok" else ""),
          flush=True)
    return dict(name=step["name"], status=status, seconds=round(seconds, 1), output_tail=text[-2000:])


def dry_run(steps: list[dict], out: Path) -> int:
    """Check every step without a GPU: files exist, Python compiles, arguments parse, tests collect."""
    problems = []
    for path in [*GPU_TESTS, BENCH, "setup.py", "CMakeLists.txt"]:
        if not (ROOT / path).exists():
            problems.append(f"missing {path}")
    for path in [*GPU_TESTS, BENCH, "setup.py", *map(str, (ROOT / "gopd_kernels").rglob("*.py"))]:
        try:
            compile((ROOT / path).read_text(), str(path), "exec")
        except (SyntaxError, OSError) as exc:
            problems.append(f"{path} does not compile: {exc}")
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            try:
                __import__(tool)  # the PyPI wheels of cmake / ninja
            except ImportError:
                problems.append(f"{tool} not found (the build step needs it)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python")]))
    bench = next(s for s in steps if s["name"] == "bench")
    checks = [("bench arguments", [*bench["cmd"], "--check-args"]),
              ("tests collect", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                                 *GPU_TESTS])]
    for what, cmd in checks:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            problems.append(f"{what}: exit {proc.returncode}: {proc.stdout[-1500:]}")
    for step in steps:
        print(f"[gpu-check --dry-run] {step['name']}: {' '.join(step['cmd'])}")
    result = dict(dry_run=True, steps=[dict(name=s["name"], cmd=s["cmd"]) for s in steps], problems=problems)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    for p in problems:
        print(f"[gpu-check --dry-run] PROBLEM: {p}")
    print(f"[gpu-check --dry-run] {'OK' if not problems else 'FAILED'}: {len(steps)} steps checked")
    return 1 if problems else 0


def table(bench_json: Path) -> list[str]:
    """The short table printed last: seconds per variant and the goals' ratios, from the benchmark's JSON."""
    if not bench_json.exists():
        return ["(no benchmark results)"]
    data = json.loads(bench_json.read_text())
    lines = [f"device: {data.get('device')}   copy bandwidth: {data.get('copy_gb_per_s') or 0:.0f} GB/s",
             f"{'shape':<22} {'mode':<8} {'variant':<18} {'ms':>9} {'peak MiB':>9}"]
    for r in data.get("rows", []):
        shape = f"{r.get('model')} N={r.get('n')}"
        ms = f"{r['seconds'] * 1e3:.1f}" if r.get("seconds") else r.get("error", "-")[:9]
        peak = r.get("peak_extra_mib")
        lines.append(f"{shape:<22} {r.get('mode', ''):<8} {r.get('variant', ''):<18} {ms:>9} "
                     f"{'' if peak is None else peak:>9}")
    for s in data.get("summary", []):
        goals = {k: v for k, v in s.items() if k not in ("model", "n", "v", "d", "mode") and v is not None}
        lines.append(f"{s['model']} N={s['n']} {s.get('mode', '')}: " +
                     ", ".join(f"{k} {v:.2f}" for k, v in goals.items()))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for the JSON, the log and the benchmark results")
    p.add_argument("--quick", action="store_true", help="the subset that fits in 3 minutes")
    p.add_argument("--wheels", type=Path, default=None, help="a folder of extra wheels (e.g. Liger-Kernel)")
    p.add_argument("--dry-run", action="store_true", help="check every step on any machine; run nothing on a GPU")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    wheels = args.wheels.resolve() if args.wheels else None
    if wheels is not None and not wheels.is_dir():
        p.error(f"--wheels {args.wheels}: not a folder")
    if wheels is not None and not any(wheels.glob("*.whl")):
        print(f"[gpu-check] --wheels {args.wheels}: no .whl files there; Liger's variant will say it is missing")
    steps = plan(out, args.quick, wheels)
    if args.dry_run:
        return dry_run(steps, out)
    if gpu_capability() is None:
        p.error("no CUDA GPU visible to torch: run with --dry-run to check the steps on this machine")

    limits = QUICK_LIMITS if args.quick else LIMITS
    pythonpath = os.pathsep.join([str(out / "site"), str(ROOT), str(ROOT / "python"),
                                  os.environ.get("PYTHONPATH", "")])
    started = time.time()
    record = dict(host=platform.node(), quick=args.quick, started=time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                  time.gmtime()), steps=[])
    with open(out / "gpu_check.log", "w") as log:
        for step in steps:
            result = run_step(step, log, limits.get(step["name"].split("-")[0], 120), pythonpath)
            record["steps"].append(result)
            if step["name"] == "env" and result["status"] == "ok":
                record["env"] = json.loads(result["output_tail"].strip().splitlines()[-1])
            if step["name"] == "build" and result["status"] != "ok":
                break  # nothing after it can run without the extension
    record["seconds"] = round(time.time() - started, 1)
    record["device"] = (record.get("env") or {}).get("device")
    (out / "gpu_check.json").write_text(json.dumps(record, indent=1) + "\n")
    print()
    for line in table(out / "loss.json"):
        print(line)
    print("\nsteps: " + ", ".join(f"{s['name']} {s['status']} ({s['seconds']} s)" for s in record["steps"]))
    print(f"total {record['seconds']} s; results in {out}")
    return 0 if all(s["status"] == "ok" for s in record["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
