#!/usr/bin/env python3
"""`make gpu-check`: one command that proves gopd on a fresh CUDA machine and tunes it.

The machine needs a CUDA build of torch, triton, nvcc, cmake and ninja; no internet and no copy of our
virtual environment (it runs with the Python it is started with). Steps, in order (what GPU time is rarest
for first); a failing step is recorded and the next one still runs:

  env     the machine: GPU and driver (nvidia-smi), torch / CUDA / triton versions, nvcc / cmake / ninja,
          and whether this torch runs the bf16 GEMMs with fp32 output that the tensor-core dH / dW path
          uses (gopd_kernels.autograd.gemm_out_dtype_support: probed by running them)
  first   the Triton kernels natively, before anything else: the row kernels against the float64 oracle
          (the test that caught FMA contraction in the forward) and the on-chip kernels against the
          reference (tests/test_triton_backend.py, tests/test_triton_onchip.py); JUnit XML first.xml
  build   the extension with its CUDA kernels against this torch: setup.py build_ext --inplace with
          GOPD_BUILD_CUDA=1 and GOPD_CUDA_ARCHS = this GPU's architecture only (a shorter compile)
  tune    benchmarks/autotune.py: the CUDA backend timed beside Triton, then a short sweep of the row
          kernels' and the on-chip kernels' tiles at the Qwen3-4B shapes, each candidate checked against the
          float64 truth before it is timed, and the chunked against the on-chip implementation; writes
          autotune.json and tuning.json (the table with this device's entry: copy it to
          gopd_kernels/tuning.json to commit it). Its share: at most a quarter of --budget (default 180 s,
          --quick 100 s), enforced by the sweep itself, which starts no candidate after its time
  tests   the other GPU tests, natively, at the tiles the tune step chose (GOPD_TUNING_TABLE=OUT/tuning.json):
          the CUDA and Triton backends against the torch backend and the reference (logits and
          fused-linear, fp32 / bf16 / fp16, ragged shapes, non-finite inputs, the logit-offset precision
          test, the bf16 tensor-core dH / dW path); JUnit XML tests.xml
  bench   benchmarks/bench_loss.py at Qwen3-4B shapes (N in {2048, 8192}, V = 151936, D = 2560, bf16,
          three heads, full and sampled) against eager torch, torch.compile of the reference, Liger's
          chunked JSD (importable, or from the wheels in --liger DIR) and the GEMM floor measured in the
          same run, plus the copy bandwidth; at the tuned tiles too

Outputs, in the folder given as the first argument: gpu_check.json (device name, versions, each
step's status and time, test counts, the tuning summary, the benchmark summary), gpu_check.log (every
step's output), first.xml, tests.xml, autotune.json, tuning.json and bench_loss.json; a short table is
printed last.

    python3 scripts/gpu_check.py OUT                 # everything (step timeouts: 24 minutes in all)
    python3 scripts/gpu_check.py OUT --quick         # a subset (step timeouts: 14 minutes in all)
    python3 scripts/gpu_check.py OUT --liger WHEELS  # Liger from a folder of wheels (no pip needed)
    python3 scripts/gpu_check.py OUT --budget 540    # every step's timeout cut to fit 540 s in all
    python3 scripts/gpu_check.py OUT --dry-run       # any machine, CPU included (CI): check every step
    make gpu-check ARGS="OUT --quick"                # the same through make; `make gpu-check --dry-run`

--dry-run runs nothing heavy: it checks that each step's programs and files exist and parse (Python
files compile; pytest collects the test steps' selections; bench_loss.py accepts the step's arguments
with --dry-run; setup.py and CMakeLists.txt are there; the tools are found, a missing nvcc only warned
about off a GPU), runs the autotune at tiny shapes (Triton's interpreter on CPU) through to the table it
writes, and writes the same JSON with "dry_run": true.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN3 = "qwen3-4b"
FIRST_FILES = ["tests/test_triton_backend.py", "tests/test_triton_onchip.py"]
TEST_FILES = ["tests/test_cuda_backend.py", "tests/test_backends.py", "tests/test_mixed_precision.py",
              "tests/test_compile.py"]
# --quick: every CUDA / Triton test, and of the cross-backend file the ones that involve them.
QUICK_K = "cuda or triton or gemm_out_dtype or tensor_core or onchip or float64_reference"
STEPS = ("first", "build", "tune", "tests", "bench")
# The tune step's share of --budget, and the seconds it keeps for writing its results after the sweep's end.
TUNE_SHARE, TUNE_MARGIN = 0.25, 30


def plan(args, out: Path, facts):
    """The steps: name -> dict(argv, env, timeout, files that must exist, python files that must compile)."""
    py = sys.executable

    def pytest(xml, files):
        return [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", f"--junitxml={out / xml}", *files]

    tests = pytest("tests.xml", TEST_FILES) + (["-k", QUICK_K] if args.quick else [])
    tune = [py, "benchmarks/autotune.py", "--out", str(out / "autotune.json"), "--table", str(out / "tuning.json")]
    tune += ["--quick"] if args.quick else []
    bench = ["benchmarks/bench_loss.py", "--out", str(out / "bench_loss.json")]
    if args.quick:
        bench += ["--shapes", f"{QWEN3}:2048", "--modes", "full", "--variants", "triton,eager,floor"]
    else:
        bench += ["--shapes", f"{QWEN3}:2048,{QWEN3}:8192", "--modes", "full,sampled",
                  "--variants", "triton,eager,compile,liger,floor"]
    build_env = {"GOPD_BUILD_CUDA": "1", "GOPD_CUDA_ARCHS": native_arch(facts) or "80;90",
                 "MAX_JOBS": str(os.cpu_count() or 4)}
    bench_env = {}
    wheels = liger_wheels(args.liger)
    if wheels:
        bench_env["PYTHONPATH"] = os.pathsep.join(map(str, wheels))
    return {
        "first": dict(argv=pytest("first.xml", FIRST_FILES), env={}, timeout=120 if args.quick else 180,
                      files=FIRST_FILES, compile=FIRST_FILES + ["tests/helpers.py"]),
        "build": dict(argv=[py, "setup.py", "build_ext", "--inplace"], env=build_env, timeout=300 if args.quick else 360,
                      files=["setup.py", "CMakeLists.txt", "csrc/cuda/rows.cu", "csrc/cuda/bindings.cpp"],
                      compile=["setup.py"]),
        "tune": dict(argv=tune, env={}, timeout=100 if args.quick else 180, files=["benchmarks/autotune.py"],
                     compile=["benchmarks/autotune.py", "benchmarks/harness.py", "gopd_kernels/tuning.py"],
                     seconds_flag=True),
        "tests": dict(argv=tests, env={}, timeout=150 if args.quick else 300, files=TEST_FILES,
                      compile=TEST_FILES + ["tests/cuda_emulation.py", "tests/helpers.py"]),
        "bench": dict(argv=[py, *bench], env=bench_env, timeout=150 if args.quick else 420,
                      files=["benchmarks/bench_loss.py"], compile=["benchmarks/bench_loss.py"]),
    }


def native_arch(facts):
    """This GPU's architecture as GOPD_CUDA_ARCHS wants it ("90" on an H100), or None without one."""
    cap = facts.get("capability")
    return cap.replace(".", "") if cap else None


def liger_wheels(folder):
    """The liger-kernel wheels (pure Python: importable from the .whl itself) in `folder`, newest last."""
    if not folder:
        return []
    path = Path(folder)
    found = sorted(path.glob("liger_kernel*.whl")) + sorted(path.glob("liger-kernel*.whl")) if path.is_dir() else []
    return found[-1:]


def tool_version(argv):
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        res = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"error: {exc}"
    lines = [line for line in (res.stdout + res.stderr).strip().splitlines() if line.strip()]
    return lines[-1].strip() if argv[0] == "nvcc" and lines else (lines[0].strip() if lines else "")


_TORCH_FACTS = r"""
import json, sys
facts = {}
try:
    import torch
    facts.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name()
        facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        facts["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        from gopd_kernels.autograd import gemm_out_dtype_support
        mm, addmm = gemm_out_dtype_support(torch.device("cuda"), torch.bfloat16)
        facts["bf16_mm_out_fp32"], facts["bf16_addmm_into_fp32"] = mm, addmm
    else:
        facts["device"] = "no CUDA GPU visible to torch"
except Exception as exc:
    facts["torch_error"] = f"{type(exc).__name__}: {exc}"
try:
    import triton
    facts["triton"] = triton.__version__
except Exception as exc:
    facts["triton_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(facts))
"""


def environment(log):
    """Facts about the machine (never raises: what failed is written down instead)."""
    facts = {"python": sys.version.split()[0], "nproc": os.cpu_count()}
    for name, argv in (("nvcc", ["nvcc", "--version"]), ("cmake", ["cmake", "--version"]),
                       ("ninja", ["ninja", "--version"]), ("nvidia_smi", ["nvidia-smi", "-L"])):
        facts[name] = tool_version(argv)
    if facts["cmake"] is None or facts["ninja"] is None:  # the PyPI wheels' copies, next to this Python
        for name in ("cmake", "ninja"):
            exe = Path(sys.executable).parent / name
            if facts[name] is None and exe.exists():
                facts[name] = tool_version([str(exe), "--version"])
    # torch / triton facts from a child process: this one never holds a CUDA context (its memory would
    # be missing from the benchmarks' GPU for the whole run).
    res = subprocess.run([sys.executable, "-c", _TORCH_FACTS], cwd=ROOT, capture_output=True, text=True, timeout=300)
    try:
        facts.update(json.loads(res.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        facts["torch_error"] = f"probe failed (rc {res.returncode}): {res.stderr[-1500:]}"
    log.write(json.dumps(facts, indent=1) + "\n")
    return facts


def budgeted(name, timeout, budget, elapsed):
    """A step's timeout under --budget: at most what is left of it, less 10 s to write the report; the tune
    step at most TUNE_SHARE of the whole budget."""
    timeout = min(timeout, budget - elapsed - 10)
    if name == "tune":
        timeout = min(timeout, TUNE_SHARE * budget)
    return max(1.0, timeout)


def step_argv(step):
    """The step's command; the tune step is told its time (its timeout less what writing its results takes)."""
    if step.get("seconds_flag"):
        return step["argv"] + ["--seconds", str(int(max(10, step["timeout"] - TUNE_MARGIN)))]
    return step["argv"]


def run_step(name, step, log):
    """Runs one step, its output streamed to the terminal and the log; returns its record."""
    argv = step_argv(step)
    env = dict(os.environ, **step["env"])
    if "PYTHONPATH" in step["env"] and os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = step["env"]["PYTHONPATH"] + os.pathsep + os.environ["PYTHONPATH"]
    header = f"\n== {name}: {' '.join(argv)}" + (f"  [{' '.join(f'{k}={v}' for k, v in step['env'].items())}]"
                                                        if step["env"] else "")
    print(header, flush=True)
    log.write(header + "\n")
    log.flush()
    start = time.monotonic()
    tail = []
    try:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
    except OSError as exc:
        return dict(name=name, status="error", rc=None, seconds=0.0, detail=str(exc))
    # A timer kills the step at its deadline even while it prints nothing (a silent compile, a hung kernel).
    killer = threading.Timer(step["timeout"], proc.kill)
    killer.start()
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            tail = (tail + [line.rstrip()])[-20:]
        proc.wait()
    finally:
        killer.cancel()
    timed_out = time.monotonic() - start >= step["timeout"] and proc.returncode is not None and proc.returncode < 0
    seconds = time.monotonic() - start
    status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed")
    log.write(f"== {name}: {status} (rc {proc.returncode}) in {seconds:.1f} s\n")
    log.flush()
    return dict(name=name, status=status, rc=proc.returncode, seconds=round(seconds, 1), tail=tail[-5:])


def dry_check(name, step, args):
    """What --dry-run checks for one step; returns its record (status ok / failed, with the problems)."""
    problems, notes = [], []
    for f in step["files"]:
        if not (ROOT / f).exists():
            problems.append(f"missing {f}")
    for f in step["compile"]:
        try:  # parse and compile in memory (no .pyc written)
            compile((ROOT / f).read_text(), str(ROOT / f), "exec")
        except (SyntaxError, ValueError, OSError) as exc:
            problems.append(f"{f} does not compile: {exc}")
    env = dict(os.environ, **step["env"])
    if name == "build":
        for tool in ("cmake", "ninja"):
            if shutil.which(tool) is None and not (Path(sys.executable).parent / tool).exists():
                problems.append(f"{tool} not found")
        if shutil.which("nvcc") is None:
            notes.append("nvcc not found here (needed on the GPU machine)")
    elif name in ("first", "tests"):
        argv = [a for a in step["argv"] if not a.startswith("--junitxml")] + ["--collect-only"]
        res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        collected = [line for line in res.stdout.splitlines() if "::" in line]
        if res.returncode != 0 or not collected:
            problems.append(f"pytest --collect-only failed (rc {res.returncode}): {res.stdout[-800:]}{res.stderr[-800:]}")
        else:
            notes.append(f"{len(collected)} tests collected")
    elif name == "tune":
        problems += dry_tune(step, env, notes)
    elif name == "bench":
        res = subprocess.run(step["argv"] + ["--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        if res.returncode != 0:
            problems.append(f"bench_loss.py rejects the arguments: {res.stderr[-800:]}")
        else:
            try:
                planned = json.loads(res.stdout.strip().splitlines()[-1])
                notes.append(f"{len(planned['shapes'])} shape(s) x modes {planned['modes']} x {planned['variants']}")
            except (ValueError, IndexError, KeyError) as exc:
                problems.append(f"bench_loss.py --dry-run printed no plan: {exc}")
        if args.liger and not liger_wheels(args.liger):
            problems.append(f"--liger {args.liger}: no liger_kernel*.whl there")
    return dict(name=name, status="failed" if problems else "ok", rc=None, seconds=0.0,
                detail="; ".join(problems + notes))


_TABLE_CHECK = r"""
import json, sys
from gopd_kernels import tuning
table = tuning.load(sys.argv[1])
entry = tuning.entry("cpu", table=table)
print(json.dumps(dict(devices=len(table["devices"]), found=entry is not None)))
"""


def dry_tune(step, env, notes):
    """The autotune at tiny shapes (the interpreter on CPU), then its table read back; returns the problems."""
    argv = step["argv"] + ["--tiny", "--seconds", "240"]
    table = Path(argv[argv.index("--table") + 1])
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        return [f"autotune.py --tiny failed (rc {res.returncode}): {res.stdout[-600:]}{res.stderr[-800:]}"]
    check = subprocess.run([sys.executable, "-c", _TABLE_CHECK, str(table)], cwd=ROOT,
                           env=dict(env, GOPD_TUNING_DEVICE="cpu"), capture_output=True, text=True, timeout=300)
    try:
        got = json.loads(check.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [f"the table autotune.py wrote does not load: {check.stderr[-800:]}"]
    if not got["found"]:
        return [f"the table {table} has no entry for this machine"]
    notes.append(f"tiny sweep ok, table written with {got['devices']} device entr{'y' if got['devices'] == 1 else 'ies'}")
    return []


def tune_summary(path: Path):
    """What gpu_check.json keeps of autotune.json: the entry, the winners, the implementation timings."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return None
    cands = data.get("candidates", [])
    return dict(entry=data.get("entry"), winners=data.get("winners"), impl=data.get("impl"),
                backends=data.get("backends"), seconds=data.get("seconds"), tiny=data.get("tiny"),
                candidates_timed=sum("seconds" in c for c in cands),
                candidates_failed=sum("error" in c for c in cands),
                candidates_skipped=sum("skipped" in c for c in cands))


def test_counts(xml_path: Path):
    if not xml_path.exists():
        return None
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return total


def table(report):
    """The short table printed last."""
    env = report["env"]
    lines = [f"gpu-check{' (dry run)' if report['dry_run'] else ''}{' --quick' if report['quick'] else ''} on "
             f"{env.get('device', '?')}: torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
             f"triton {env.get('triton')}, nvcc {env.get('nvcc')}",
             f"  bf16 GEMM with fp32 output: mm {env.get('bf16_mm_out_fp32', '-')}, "
             f"addmm into fp32 {env.get('bf16_addmm_into_fp32', '-')}",
             f"{'step':<7} {'status':<8} {'seconds':>8}  detail"]
    for s in report["steps"]:
        detail = s.get("detail", "")
        t = report.get(s["name"]) if s["name"] in ("first", "tests") else None
        if t:
            detail = f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"
        lines.append(f"{s['name']:<7} {s['status']:<8} {s['seconds']:>8.1f}  {detail[:150]}")
    rows = (report.get("bench") or {}).get("rows") or []
    if rows:
        names = [("fused/triton-3h", "fused3h"), ("fused/onchip-3h", "onchip3h"), ("fused/triton-2h", "fused2h"),
                 ("logits/triton", "logits"),
                 ("eager/torch-3h", "eager3h"), ("compile/torch-3h", "compile3h"), ("liger/jsd-2h", "liger2h"),
                 ("floor/gemm-3h", "floor3h")]
        lines.append("bench, ms per forward + backward (bf16):")
        lines.append(f"  {'shape':<26}" + "".join(f"{short:>10}" for _, short in names))
        keys = sorted({(r.get("model"), r.get("n"), r.get("mode", "full")) for r in rows if r.get("variant")},
                      key=lambda k: (k[0], k[1], k[2]))
        for model, n, mode in keys:
            got = {r["variant"]: r for r in rows if (r.get("model"), r.get("n"), r.get("mode", "full")) == (model, n, mode)}
            cells = []
            for name, _ in names:
                r = got.get(name)
                cells.append("-" if r is None else ("OOM" if r.get("error") == "OOM" else
                                                    "err" if r.get("seconds") is None else f"{r['seconds'] * 1e3:.1f}"))
            lines.append(f"  {f'{model} N={n} {mode}':<26}" + "".join(f"{c:>10}" for c in cells))
        for s in (report["bench"].get("summary") or []):
            def fmt(x):
                return "-" if x is None else f"{x:.2f}"
            lines.append(f"  {s['model']} N={s['n']} {s.get('mode', 'full')}: fused3h / GEMM floor "
                         f"{fmt(s.get('fused3h_over_gemm_floor'))}, Liger2h / fused2h {fmt(s.get('liger2h_over_fused2h'))}, "
                         f"eager3h / fused3h {fmt(s.get('eager3h_over_fused3h'))}, logits bandwidth / copy "
                         f"{fmt(s.get('logits_bandwidth_fraction_of_copy'))}, onchip3h / fused3h "
                         f"{fmt(s.get('onchip3h_over_fused3h'))}")
            if s.get("score_chunked_over_gemm") is not None:
                lines.append(f"    forward-only scoring, 1 head: chunked / GEMM {fmt(s.get('score_chunked_over_gemm'))}, "
                             f"onchip / chunked {fmt(s.get('score_onchip_over_chunked'))}")
            if s.get("score_onchip_ms_by_tile"):
                lines.append("    on-chip forward ms by tile: " + ", ".join(
                    f"{tile} {ms:.2f}" for tile, ms in s["score_onchip_ms_by_tile"].items()))
        if report["bench"].get("copy_gb_per_s"):
            lines.append(f"  copy bandwidth {report['bench']['copy_gb_per_s']:.0f} GB/s")
    lines += tune_lines(report.get("tune"))
    return "\n".join(lines)


def tune_lines(tune):
    """The tuning summary's lines of the table: winners against the defaults, implementations, backends."""
    if not tune:
        return []
    out = [f"tune{' (tiny shapes: not performance numbers)' if tune.get('tiny') else ''}: "
           f"{tune['candidates_timed']} candidates timed, {tune['candidates_failed']} failed a check or to launch, "
           f"{tune['candidates_skipped']} left out of time, {tune.get('seconds')} s"]
    for kernel, by_class in (tune.get("winners") or {}).items():
        for cls, win in by_class.items():
            speed = f"{win['speedup']:.2f}x the defaults" if win.get("speedup") else "defaults not timed"
            out.append(f"  {kernel:16s} {cls:18s} {win['seconds'] * 1e3:9.3f} ms  {win['tiles'] or 'defaults'} ({speed})")
    for r in tune.get("impl") or []:
        if "use" in r:
            ms = {k: f"{r[k + '_s'] * 1e3:.2f}" if r.get(k + "_s") else r.get(k + "_error", "-")[:40]
                  for k in ("chunked", "onchip")}
            out.append(f"  impl {r['use']:13s} N={r['n']:5d}: chunked {ms['chunked']} ms, onchip {ms['onchip']} ms")
    for r in tune.get("backends") or []:
        cells = [f"{b} {r[b + '_s'] * 1e3:.2f} ms" if r.get(b + "_s") else f"{b} {r.get(b + '_error', '-')[:40]}"
                 for b in ("triton", "cuda")]
        out.append(f"  fused 3h full N={r['n']}: " + ", ".join(cells))
    entry = tune.get("entry") or {}
    if entry:
        out.append(f"  table entry for {entry.get('device')}: backend {entry.get('backend', '-')}, impl "
                   f"{json.dumps(entry.get('impl'))}, {sum(len(v) for v in (entry.get('tiles') or {}).values())} "
                   "tile choice(s) beating the defaults")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default=str(ROOT / "gpu-check-out"),
                   help="folder for gpu_check.json, gpu_check.log, tests.xml, bench_loss.json (default: ./gpu-check-out)")
    p.add_argument("--quick", action="store_true", help="the subset that fits ~3 minutes")
    p.add_argument("--liger", default=None, help="a folder of wheels holding liger-kernel (imported from the wheel)")
    p.add_argument("--dry-run", action="store_true", help="check that every step exists and parses; run nothing")
    p.add_argument("--skip", default="", help=f"comma list of steps to leave out ({', '.join(STEPS)})")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run: each step's timeout is cut to what is left (less a margin), "
                        "so the JSON and the table are written even when a lease's time is short")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    skip = {s for s in args.skip.split(",") if s}
    if not skip <= set(STEPS):
        p.error(f"--skip: unknown step(s) {sorted(skip - set(STEPS))}; expected some of {', '.join(STEPS)}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = dict(dry_run=args.dry_run, quick=args.quick, out=str(out), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                  steps=[], first=None, tests=None, tune=None, bench=None)
    with open(out / "gpu_check.log", "w") as log:
        t0 = time.monotonic()
        report["env"] = environment(log)
        steps = plan(args, out, report["env"])
        ok_env = report["env"].get("cuda_available") or args.dry_run
        report["steps"].append(dict(name="env", status="ok" if ok_env and "torch_error" not in report["env"] else "failed",
                                    rc=None, seconds=round(time.monotonic() - t0, 1),
                                    detail=report["env"].get("device", report["env"].get("torch_error", ""))))
        for name, step in steps.items():
            if name in skip:
                report["steps"].append(dict(name=name, status="skipped", rc=None, seconds=0.0, detail="--skip"))
                continue
            t1 = time.monotonic()
            if args.budget is not None:
                step["timeout"] = budgeted(name, step["timeout"], args.budget, time.monotonic() - t0)
            if name in ("tests", "bench") and (out / "tuning.json").exists() and not args.dry_run:
                # The steps after the tune run at its tiles: the tests check them, the benchmark times them.
                step["env"]["GOPD_TUNING_TABLE"] = str(out / "tuning.json")
            record = dry_check(name, step, args) if args.dry_run else run_step(name, step, log)
            record["seconds"] = round(time.monotonic() - t1, 1)
            report["steps"].append(record)
            if not args.dry_run and name in ("first", "tests"):
                report[name] = test_counts(out / f"{name}.xml")
            if name == "tune":
                report["tune"] = tune_summary(out / "autotune.json")
            if not args.dry_run and name == "bench" and (out / "bench_loss.json").exists():
                report["bench"] = json.loads((out / "bench_loss.json").read_text())
    report["seconds"] = round(time.time() - started, 1)
    report["device"] = report["env"].get("device")
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    text = table(report)
    with open(out / "gpu_check.log", "a") as log:
        log.write("\n" + text + "\n")
    print("\n" + text, flush=True)
    failed = [s["name"] for s in report["steps"] if s["status"] not in ("ok", "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
