"""Progress of long jobs: tqdm bars on a terminal, plain lines in logs.

``progress_bar``: a tqdm bar, shown only when stderr is a terminal (tqdm's ``disable=None``), so logs of
batch jobs and CI stay free of carriage-return noise; ``progress=False`` (config key ``progress``)
silences it. Bars inside a step are transient (``leave=False``): only the steps bar stays on screen.

``phase(name, total)``: one phase of a job (the training steps, an SFT expert's build, an evaluation),
advanced with ``advance()``. When stdout is not a terminal (``gopd demo > log``) it prints plain lines

    [progress] demo > train opd: 3/8 | elapsed 1m05s | remaining ~1m48s | loss 0.123

(the enclosing phases' names, then the innermost phase's k/n, its elapsed time and the remaining time
estimated from its mean time per unit so far). A daemon thread prints the innermost phase's line whenever
no progress line was printed for ``interval`` seconds (default 30, environment variable
GOPD_PROGRESS_INTERVAL), so a single long step still shows that the job is alive; ``advance()`` prints
one when that much time has passed too. On a terminal no line is printed (the bars show progress there);
under torchrun only rank 0 prints lines; GOPD_PROGRESS_INTERVAL=0 turns them off. The lines do not depend
on the config key ``progress``, which is about bars only.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, List, Optional

INTERVAL_ENV = "GOPD_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def progress_bar(iterable=None, *, progress: bool, desc: str, total=None, leave: bool = False, **kwargs):
    """A tqdm bar over iterable (or a manual one with total), quiet unless progress and a TTY."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave, disable=None if progress else True,
                dynamic_ncols=True, **kwargs)


def note(message: str) -> None:
    """Prints a line without breaking an active bar (tqdm.write falls back to print)."""
    from tqdm import tqdm

    tqdm.write(message)


def interval_from_env() -> float:
    """Seconds between heartbeat lines: $GOPD_PROGRESS_INTERVAL, else 30; 0 means no lines."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or raw == "":
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise ValueError(f"{INTERVAL_ENV} must be a number of seconds >= 0 (0: no progress lines), got {raw!r}")
    return value


def duration(seconds: float) -> str:
    """42s, 3m05s, 1h02m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class _Reporter:
    """The phases open in this process (outermost first), the time of the last line, and the heartbeat
    thread. One exists while a line-printing phase is open; nested phases share it."""

    def __init__(self, stream, clock: Callable[[], float], interval: float, heartbeat: bool):
        self.stream, self.clock, self.interval = stream, clock, interval
        self.stack: List[Phase] = []
        self.lock = threading.RLock()
        self.last_line = clock()
        self._stop = threading.Event()
        self._thread = None
        if heartbeat:
            self._thread = threading.Thread(target=self._beat, name="gopd-progress", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        poll = min(1.0, self.interval / 4)
        while not self._stop.wait(poll):
            self.tick()

    def tick(self, phase: Optional["Phase"] = None) -> bool:
        """Prints `phase`'s line (default: the innermost phase's) if no line came for `interval` s."""
        with self.lock:
            if not self.stack or self.clock() - self.last_line < self.interval:
                return False
            self.print_line(phase or self.stack[-1])
            return True

    def print_line(self, phase: "Phase") -> None:
        with self.lock:
            now = self.clock()
            self.last_line = now
            outer = [p.name for p in self.stack[:self.stack.index(phase)]] if phase in self.stack else []
            line = "[progress] " + " > ".join(outer + [phase.status(now)])
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # a closed stream: the job goes on without progress lines
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


_reporter: Optional[_Reporter] = None
_reporter_lock = threading.Lock()


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):
        return False


def _main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


class Phase:
    """One phase of a job; see the module docstring. Use as a context manager (``with phase(...) as p``)."""

    def __init__(self, name: str, total: Optional[int] = None, *, done: int = 0, bar: bool = False,
                 leave: bool = False, stream=None, clock: Callable[[], float] = time.monotonic,
                 interval: Optional[float] = None, heartbeat: bool = True):
        self.name, self.total, self.done = name, total, done
        self._start_done = done
        self.postfix: dict = {}
        self._bar = progress_bar(total=total, initial=done, desc=name, progress=True, leave=leave) if bar else None
        self._reporter: Optional[_Reporter] = None
        self._owns_reporter = False
        self.clock = clock
        self.started = clock()
        stream = sys.stdout if stream is None else stream
        interval = interval_from_env() if interval is None else interval
        global _reporter
        with _reporter_lock:
            if _reporter is None:
                if interval == 0 or _is_terminal(stream) or not _main_rank():
                    return
                _reporter = _Reporter(stream, clock, interval, heartbeat)
                self._owns_reporter = True
            self._reporter = _reporter
        self.clock = self._reporter.clock
        self.started = self.clock()
        with self._reporter.lock:
            self._reporter.stack.append(self)

    def status(self, now: float) -> str:
        """'name: k/n | elapsed .. | remaining ~..' (and the postfix), as of clock time `now`."""
        elapsed = now - self.started
        parts = [f"{self.name}: {self.done}/{self.total}" if self.total is not None else
                 f"{self.name}: {self.done} done", f"elapsed {duration(elapsed)}"]
        if self.total is not None:
            progressed = self.done - self._start_done
            if self.done >= self.total:
                parts.append("remaining 0s")
            elif progressed > 0:
                parts.append(f"remaining ~{duration(elapsed / progressed * (self.total - self.done))}")
            else:
                parts.append("remaining ?")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return " | ".join(parts)

    def advance(self, n: int = 1, **postfix) -> None:
        """n more units done; `postfix` (e.g. loss=...) is shown on the bar and on the lines."""
        self.done += n
        if postfix:
            self.postfix = {k: v for k, v in postfix.items()}
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(**postfix)
        if self._reporter is not None:
            self._reporter.tick(self)

    def beat(self) -> bool:
        """What the heartbeat thread does (tests call it with a fake clock): prints the innermost open
        phase's line if no progress line was printed for `interval` seconds; True if it printed."""
        return self._reporter.tick() if self._reporter is not None else False

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        rep, self._reporter = self._reporter, None
        if rep is None:
            return
        global _reporter
        with rep.lock:
            if self in rep.stack:
                rep.stack.remove(self)
        if self._owns_reporter:
            rep.stop()
            with _reporter_lock:
                if _reporter is rep:
                    _reporter = None

    def __enter__(self) -> "Phase":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def phase(name: str, total: Optional[int] = None, **kwargs) -> Phase:
    """A Phase (see the module docstring): ``with phase("train", total=steps) as p: ... p.advance()``.
    Keywords: done (units already done, e.g. on resume), bar (also a tqdm bar, shown on a terminal; leave
    keeps it on screen), and for tests stream, clock, interval (seconds), heartbeat (False: no thread)."""
    return Phase(name, total, **kwargs)
