"""`make gpu-check --dry-run` (scripts/gpu_check.py --dry-run) runs on CPU in CI: every step it would run
on a GPU machine exists and parses, so the one command does not rot between GPU runs (issue 16)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _dry_run(tmp_path, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), str(tmp_path), "--dry-run", *args],
                          capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    return proc, report


def test_gpu_check_dry_run_checks_every_step(tmp_path):
    """The full run's steps (the --quick ones differ only in their arguments: fewer tests and shapes)."""
    pytest.importorskip("triton")
    quick = False
    proc, report = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["env", "build", "tests", "bench"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert "tests collected" in steps["tests"]["detail"]
    assert report["dry_run"] is True and report["quick"] is quick and "device" in report
    assert (tmp_path / "gpu_check.log").exists()
    # The table comes last.
    assert proc.stdout.strip().splitlines()[-1].startswith("bench "), proc.stdout[-1000:]


def test_gpu_check_dry_run_fails_on_a_missing_wheel_folder(tmp_path):
    """--quick, and a step whose check fails makes the dry run fail (rc 1), naming the problem."""
    pytest.importorskip("triton")
    proc, report = _dry_run(tmp_path, "--quick", "--liger", str(tmp_path / "no-such-folder"), "--skip", "tests")
    assert proc.returncode == 1
    assert report["quick"] is True
    assert next(s for s in report["steps"] if s["name"] == "tests")["status"] == "skipped"
    bench = next(s for s in report["steps"] if s["name"] == "bench")
    assert bench["status"] == "failed" and "liger" in bench["detail"]


def test_a_silent_step_is_killed_at_its_deadline():
    """A step that prints nothing (a hung kernel, a silent compile) is still stopped at its timeout, so
    --budget can promise that the JSON is written inside a lease's time."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    import io

    record = gpu_check.run_step("hang", dict(argv=[sys.executable, "-c", "import time; time.sleep(60)"], env={},
                                             timeout=1.5), io.StringIO())
    assert record["status"] == "timeout" and record["seconds"] < 10
    record = gpu_check.run_step("ok", dict(argv=[sys.executable, "-c", "print('hi')"], env={}, timeout=30),
                                io.StringIO())
    assert record["status"] == "ok" and record["tail"] == ["hi"]
