"""`gopd serve` as a child process on a free loopback port: for tests, benchmarks and scripts."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import List, Optional, Tuple


def launch(args: List[str], timeout: float = 600.0, env: Optional[dict] = None) -> Tuple[subprocess.Popen, str]:
    """Starts `python -m gopd serve --port 0 ARGS...` and waits for its "listening on URL" line.

    Returns (process, url). Raises RuntimeError with the server's output if it exits or does not announce
    itself within `timeout` seconds (the process is then stopped)."""
    proc = subprocess.Popen([sys.executable, "-m", "gopd", "serve", "--host", "127.0.0.1", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, found = [], []

    def read():  # keeps draining the pipe for the server's whole life, so it never blocks on a full pipe
        for line in proc.stdout:
            lines.append(line)
            if "listening on " in line and not found:
                found.append(line.rsplit("listening on ", 1)[1].strip())

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not found:
        stop(proc)
        raise RuntimeError("gopd serve did not start:\n" + "".join(lines))
    return proc, found[0]


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminates the server (killed if it has not exited after `timeout` seconds)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
