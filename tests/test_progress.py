"""Progress in logs (gopd.progress): plain lines with phase, k/n, elapsed and remaining time when stdout is
not a terminal, a heartbeat line when nothing was printed for the interval, nothing on a terminal."""

import io
import re
import threading
import time

import pytest

from gopd import progress
from gopd.progress import phase

SMOKE = "configs/smoke.yaml"
LINE = re.compile(r"^\[progress\] (?P<path>.+?): (?P<k>\d+)/(?P<n>\d+) \| elapsed (?P<elapsed>\S+) \| "
                  r"remaining (?P<eta>\S+)")


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_lines_carry_phase_step_elapsed_and_eta_on_a_fake_clock():
    out, clock = io.StringIO(), Clock()
    with phase("train", total=4, stream=out, clock=clock, interval=30, heartbeat=False) as steps:
        clock.t = 10
        steps.advance(loss="0.5")
        assert out.getvalue() == ""  # less than the interval since the phase began
        clock.t = 40
        steps.advance(loss="0.25")
        assert out.getvalue() == "[progress] train: 2/4 | elapsed 40s | remaining ~40s | loss 0.25\n"
        clock.t = 60
        assert not steps.beat()  # 20 s since the last line
        with phase("SFT expert", total=10, stream=out, clock=clock, heartbeat=False) as sft:
            clock.t = 75  # a long unit of work: the heartbeat reports the innermost phase, with its parents
            assert sft.beat()
            clock.t = 200
            sft.advance(3)
        clock.t = 300
        assert steps.beat()
    lines = out.getvalue().splitlines()
    assert lines[1] == "[progress] train > SFT expert: 0/10 | elapsed 15s | remaining ?"
    assert lines[2] == "[progress] train > SFT expert: 3/10 | elapsed 2m20s | remaining ~5m27s"
    assert lines[3] == "[progress] train: 2/4 | elapsed 5m00s | remaining ~5m00s | loss 0.25"
    assert progress._reporter is None  # closed with its phase


def test_nothing_is_printed_on_a_terminal_and_the_interval_env_is_checked(monkeypatch):
    term, clock = Terminal(), Clock()
    with phase("train", total=2, stream=term, clock=clock, interval=1, heartbeat=False) as steps:
        clock.t = 5
        steps.advance()
        assert not steps.beat()
    assert term.getvalue() == ""
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")  # 0: no lines at all
    out = io.StringIO()
    with phase("train", total=2, stream=out, clock=clock, heartbeat=False) as steps:
        clock.t = 1e6
        steps.advance()
    assert out.getvalue() == ""
    monkeypatch.setenv(progress.INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match=progress.INTERVAL_ENV):
        phase("train", total=2, stream=out)


def test_heartbeat_thread_prints_during_one_long_step_and_stops_with_the_phase(monkeypatch, capsys):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.05")
    with phase("one slow step", total=1):
        time.sleep(0.5)  # no advance at all: only the heartbeat can speak
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) >= 3 and all(LINE.match(x) for x in printed), printed
    assert LINE.match(printed[0])["path"] == "one slow step" and LINE.match(printed[0])["eta"] == "?"
    time.sleep(0.2)
    assert capsys.readouterr().out == ""
    assert not any(t.name == "gopd-progress" for t in threading.enumerate())


def test_gopd_train_with_an_sft_teacher_prints_progress_lines_in_a_log(monkeypatch, capsys, tmp_path):
    """`gopd train` into a non-terminal stdout (capsys): lines for the SFT expert's build and the steps."""
    from gopd.cli import main

    student = "{tiny: {hidden_size: 32, num_hidden_layers: 2}, seed: 0}"
    args = ["train", "--config", SMOKE, "--set", f"out_dir={tmp_path / 'run'}", "--set", "steps=2",
            "--set", f"teacher={{sft: {student}, steps: 2}}", "--set", f"expert_cache={tmp_path / 'experts'}",
            "--set", "n_eval=2", "--set", "eval_max_new_tokens=2", "--set", "eval_teachers=false"]
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.001")
    assert main(args) == 0
    lines = [LINE.match(x) for x in capsys.readouterr().out.splitlines() if x.startswith("[progress]")]
    assert all(lines)
    paths = {m["path"] for m in lines}
    assert {"SFT teacher", "train run"} <= paths, paths
    assert {(m["k"], m["n"]) for m in lines if m["path"] == "train run"} >= {("1", "2"), ("2", "2")}
    assert any(m["eta"].startswith("~") for m in lines)

    # The same run with stdout a terminal: no progress line (tqdm bars, on stderr, are off in this config).
    term = Terminal()
    monkeypatch.setattr("sys.stdout", term)
    assert main(args[:4] + [f"out_dir={tmp_path / 'tty'}"] + args[5:]) == 0
    assert "[progress]" not in term.getvalue() and '"step": 2' in term.getvalue()
