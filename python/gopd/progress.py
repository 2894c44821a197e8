"""tqdm progress bars for the trainer's phases (rollouts, scoring, steps, eval).

``progress=True`` shows a bar only when stderr is a terminal (tqdm's ``disable=None``), so logs of
batch jobs and CI stay free of carriage-return noise; ``progress=False`` (config key ``progress``)
silences every bar. Phase bars inside a step are transient (``leave=False``): only the steps bar
stays on screen.
"""

from __future__ import annotations


def progress_bar(iterable=None, *, progress: bool, desc: str, total=None, leave: bool = False, **kwargs):
    """A tqdm bar over iterable (or a manual one with total), quiet unless progress and a TTY."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave, disable=None if progress else True,
                dynamic_ncols=True, **kwargs)


def note(message: str) -> None:
    """Prints a line without breaking an active bar (tqdm.write falls back to print)."""
    from tqdm import tqdm

    tqdm.write(message)
