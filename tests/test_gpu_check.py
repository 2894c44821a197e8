"""`make gpu-check --dry-run` (scripts/gpu_check.py --dry-run) runs on CPU in CI: every step it would run
on a GPU machine exists and parses, and the autotune runs at tiny shapes through to the table it writes,
so the one command does not rot between GPU runs."""

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _import(folder, name):
    sys.path.insert(0, str(ROOT / folder))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def _dry_run(tmp_path, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), str(tmp_path), "--dry-run", *args],
                          capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    return proc, report


def test_gpu_check_dry_run_checks_every_step_and_tunes_at_tiny_shapes(tmp_path):
    """The full run's steps (the --quick ones differ only in their arguments: fewer tests, shapes, candidates)."""
    pytest.importorskip("triton")
    from gopd_kernels import tuning

    proc, report = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["env", "first", "build", "tune", "tests", "bench"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert "tests collected" in steps["first"]["detail"] and "tests collected" in steps["tests"]["detail"]
    assert report["dry_run"] is True and report["quick"] is False and "device" in report
    assert (tmp_path / "gpu_check.log").exists()
    # The autotune ran: every candidate was checked against the float64 truth before it was timed, and the
    # table it wrote loads and holds this machine's entry.
    tune = json.loads((tmp_path / "autotune.json").read_text())
    assert tune["tiny"] is True and tune["candidates"]
    defaults = {(c["kernel"], c["shape_class"]): c["err_small"] for c in tune["candidates"] if not c["tiles"]}
    for c in tune["candidates"]:  # bf16 on-chip gradients: dz is rounded to bf16 (as the chunked path does)
        limit = max(4 * defaults[c["kernel"], c["shape_class"]], 1e-5)
        assert "seconds" in c and c["err_small"] <= limit and c["err_vs_defaults"] <= 1e-3, c
    assert max(defaults.values()) < 1e-2 and min(defaults.values()) < 1e-6
    kernels = {c["kernel"] for c in tune["candidates"]}
    assert kernels == {"rows_forward", "rows_backward", "onchip_forward", "onchip_backward"}
    assert {r["use"] for r in tune["impl"]} == {"train_full", "train_sampled", "score"}
    assert all(r["chunked_s"] > 0 and r["onchip_s"] > 0 for r in tune["impl"])
    table = tuning.load(tmp_path / "tuning.json")
    assert tuning.entry("cpu", table=table, name=tune["entry"]["device"]) == tune["entry"]
    assert report["tune"]["entry"] == tune["entry"] and report["tune"]["candidates_timed"] == len(tune["candidates"])
    # The table comes last, the tuning summary at its end.
    lines = proc.stdout.strip().splitlines()
    head = max(i for i, line in enumerate(lines) if line.startswith("gpu-check (dry run)"))
    assert [line.split()[0] for line in lines[head + 3:head + 9]] == list(steps), lines[head:]
    assert lines[-1].startswith("  table entry for "), lines[-3:]


def test_gpu_check_dry_run_fails_on_a_missing_wheel_folder(tmp_path):
    """--quick, and a step whose check fails makes the dry run fail (rc 1), naming the problem."""
    pytest.importorskip("triton")
    proc, report = _dry_run(tmp_path, "--quick", "--liger", str(tmp_path / "no-such-folder"),
                            "--skip", "first,tune,tests")
    assert proc.returncode == 1
    assert report["quick"] is True
    assert {s["name"]: s["status"] for s in report["steps"]}["tests"] == "skipped"
    bench = next(s for s in report["steps"] if s["name"] == "bench")
    assert bench["status"] == "failed" and "liger" in bench["detail"]


def test_a_silent_step_is_killed_at_its_deadline():
    """A step that prints nothing (a hung kernel, a silent compile) is still stopped at its timeout, so
    --budget can promise that the JSON is written inside a lease's time."""
    gpu_check = _import("scripts", "gpu_check")
    record = gpu_check.run_step("hang", dict(argv=[sys.executable, "-c", "import time; time.sleep(60)"], env={},
                                             timeout=1.5), io.StringIO())
    assert record["status"] == "timeout" and record["seconds"] < 10
    record = gpu_check.run_step("ok", dict(argv=[sys.executable, "-c", "print('hi')"], env={}, timeout=30),
                                io.StringIO())
    assert record["status"] == "ok" and record["tail"] == ["hi"]


def test_the_tune_step_keeps_to_its_share_of_the_budget(tmp_path):
    gpu_check = _import("scripts", "gpu_check")
    assert gpu_check.budgeted("tune", 180, 400, elapsed=50) == 100  # a quarter of 400 s
    assert gpu_check.budgeted("tune", 180, 400, elapsed=350) == 40  # what is left, less 10 s
    assert gpu_check.budgeted("tests", 300, 400, elapsed=50) == 300
    args = argparse.Namespace(quick=False, liger=None)
    step = gpu_check.plan(args, tmp_path, {})["tune"]
    step["timeout"] = 100
    argv = gpu_check.step_argv(step)
    assert argv[-2:] == ["--seconds", str(100 - gpu_check.TUNE_MARGIN)] and "--table" in argv


def test_the_autotune_never_times_a_wrong_candidate(monkeypatch):
    """A candidate whose result is off (here: made so) is rejected with the error against the float64
    truth, never timed, and the defaults stay: no tiles enter the table."""
    pytest.importorskip("triton")
    autotune = _import("benchmarks", "autotune")
    if torch.cuda.is_available():
        pytest.skip("the tiny sweep is for CPU tensors under the interpreter")
    bad = autotune.TINY_CANDIDATES["rows_forward"][1]
    real = autotune.Problem.run

    def run(self, cfg):
        out = real(self, cfg)
        if cfg == bad:  # one statistic of one row off by 1e-3
            out[0][6, 1] += 1e-3
        return out

    monkeypatch.setattr(autotune.Problem, "run", run)
    sweep = autotune.Sweep(argparse.Namespace(tiny=True, quick=False, seconds=300), torch.device("cpu"))
    sweep.chunk = 4
    sweep.kernel("rows_forward", torch.float32, 3, 4, 40, 16, True)
    default, rejected = sweep.candidates
    assert "seconds" in default and "seconds" not in rejected and "wrong at" in rejected["error"], rejected
    assert sweep.winners["rows_forward"]["fp32/3m/n<=4096"]["tiles"] == {}
    assert sweep.entry()["tiles"] == {}
