"""`make gpu-check`'s script checks its own steps without a GPU (--dry-run), as CI runs it."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_dry_run_checks_every_step(tmp_path):
    proc = _run(str(tmp_path), "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["problems"] == []
    assert [s["name"] for s in result["steps"]] == ["env", "env-tools", "build", "tests", "bench"]
    bench = next(s for s in result["steps"] if s["name"] == "bench")["cmd"]
    assert "8192" in bench and "full,sampled" in bench


def test_dry_run_fails_on_a_step_that_does_not_parse(tmp_path, monkeypatch, capsys):
    # A benchmark argument the script no longer understands must fail the dry run, not the GPU session.
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    plan = gpu_check.plan

    def broken(*args):
        return [dict(s, cmd=s["cmd"] + ["--no-such-flag"]) if s["name"] == "bench" else s for s in plan(*args)]

    monkeypatch.setattr(gpu_check, "plan", broken)
    assert gpu_check.main([str(tmp_path), "--dry-run"]) == 1
    assert "PROBLEM: bench arguments" in capsys.readouterr().out


def test_refuses_to_run_for_real_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        return
    proc = _run(str(tmp_path))
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
