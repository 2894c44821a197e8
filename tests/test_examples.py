"""The examples run, and their losses fall (a flipped gradient makes them rise)."""

import importlib.util
from pathlib import Path

from helpers import need

need("transformers")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_loop_moves_the_student_toward_the_teacher():
    first, last = _load("plain_loop").main(steps=8)
    # Seen: 3.02 -> 2.52 in 8 steps; 3.02 -> 3.22 with the loss's gradient flipped (value kept).
    assert last < 0.9 * first, (first, last)


def test_trl_example_moves_the_student_toward_the_teacher(tmp_path):
    need("trl")
    first, last = _load("trl_distill").main(steps=8, out_dir=str(tmp_path))
    # Seen: 2.84 -> 2.42 in 8 steps; 2.84 -> 3.58 with the loss's gradient flipped (value kept).
    assert last < 0.92 * first, (first, last)
