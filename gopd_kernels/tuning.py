"""The per-device table that `backend="auto"` and the Triton kernels read at run time.

The table (``gopd_kernels/tuning.json``; ``make gpu-check`` writes it from its measurements) is a JSON
object ``{"format": 1, "devices": [entry, ...]}``. An entry applies to one device (its name as torch
reports it, e.g. "NVIDIA H200") under the torch and triton versions it was measured with (major.minor:
another compiler may want other tiles) and holds

  backend  the backend `backend="auto"` tries first for tensors on that device ("triton", "cuda", ...)
  impl     per shape class, the fused-linear implementation ("chunked" or "onchip") that was faster,
           for "train_full" / "train_sampled" (forward + backward in that mode) and "score" (forward
           only, no gradient)
  tiles    per kernel ("rows_forward", "rows_backward", "onchip_forward", "onchip_backward") and shape
           class, the launch parameters that were fastest among those found correct: block sizes
           (block_v; block_n / block_v / block_d for the on-chip kernels), num_warps, num_stages

A shape class is ``"<dtype>/<models>m/n<=4096"`` or ``".../n>4096"``: the dtype group of the kernel's
input (16bit, fp32, fp64), how many models' logits the launch reads (1-3) and how many rows (tokens) it
covers. What the table does not name, a device it does not list, or other versions, get the kernels' own
defaults: the table only ever replaces a default by a measured winner.

Environment: GOPD_TUNING_TABLE=PATH reads another table ("none": no table at all); GOPD_TUNING_DEVICE=NAME
looks NAME up instead of the device's own name (how the tests fake a GPU on CPU tensors). `forced`
pins tiles for the autotuner. A malformed table raises TableError naming the file and the key.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from pathlib import Path

import torch

from . import _options

TABLE_PATH = Path(__file__).with_name("tuning.json")
FORMAT = 1
KERNELS = ("rows_forward", "rows_backward", "onchip_forward", "onchip_backward")
USES = ("train_full", "train_sampled", "score")
# A table entry names a concrete implementation ("auto" is what reads the table).
IMPLS = tuple(i for i in _options.IMPLS if i != "auto")
BACKENDS = _options.BACKENDS
# Rows per launch that split the two row classes: gpu-check measures N = 2048 and N = 8192.
N_SPLIT = 4096
# Launch parameters each kernel takes, beyond num_warps / num_stages.
_BLOCKS = {"rows_forward": ("block_v",), "rows_backward": ("block_v",),
           "onchip_forward": ("block_n", "block_v", "block_d"), "onchip_backward": ("block_n", "block_v", "block_d")}
_CLASS = re.compile(r"^(16bit|fp32|fp64)/[123]m/n(<=|>)" + str(N_SPLIT) + "$")
_forced: dict = {}


class TableError(ValueError):
    """A tuning table that cannot be used: the message names the file and the key."""


def dtype_group(dtype: torch.dtype) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return "16bit"
    return "fp64" if dtype == torch.float64 else "fp32"


def shape_class(dtype: torch.dtype, models: int, n: int) -> str:
    """The class of a launch on `dtype` input reading `models` models' logits over `n` rows."""
    return f"{dtype_group(dtype)}/{models}m/n{'<=' if n <= N_SPLIT else '>'}{N_SPLIT}"


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


@functools.lru_cache(maxsize=1)
def versions() -> dict:
    """The running torch and triton versions as the table records them (major.minor; triton None if absent)."""
    try:
        import triton
        tri = _major_minor(triton.__version__)
    except ImportError:
        tri = None
    return {"torch": _major_minor(torch.__version__), "triton": tri}


@functools.lru_cache(maxsize=16)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device) -> str:
    """What the table is looked up by: GOPD_TUNING_DEVICE if set, the CUDA device's name, else its type."""
    fake = os.environ.get("GOPD_TUNING_DEVICE")
    if fake:
        return fake
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():  # (auto is resolved for CUDA devices without one too)
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


def table_path():
    """The table in use: GOPD_TUNING_TABLE, else the committed one; None for GOPD_TUNING_TABLE=none."""
    env = os.environ.get("GOPD_TUNING_TABLE")
    if env and env.lower() == "none":
        return None
    return Path(env) if env else TABLE_PATH


def _power_of_two(x, low):
    return isinstance(x, int) and not isinstance(x, bool) and x >= low and x & (x - 1) == 0


def _check_tiles(kernel, cfg, where):
    if not isinstance(cfg, dict):
        raise TableError(f"{where}: expected an object of launch parameters, got {cfg!r}")
    known = set(_BLOCKS[kernel]) | {"num_warps", "num_stages"}
    for key, value in cfg.items():
        at = f"{where}.{key}"
        if key not in known:
            raise TableError(f"{at}: unknown launch parameter for {kernel}; expected some of {sorted(known)}")
        if key == "num_warps" and not (_power_of_two(value, 1) and value <= 32):
            raise TableError(f"{at}: expected a power of two from 1 to 32, got {value!r}")
        if key == "num_stages" and not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8):
            raise TableError(f"{at}: expected an int from 1 to 8, got {value!r}")
        # tl.dot needs every tile dimension >= 16; the row kernels' tiles are at least 16 wide too.
        if key.startswith("block_") and not _power_of_two(value, 16):
            raise TableError(f"{at}: expected a power of two >= 16, got {value!r}")


def validate(data, path) -> dict:
    """`data` (a parsed table) if it is well formed; else TableError naming `path` and the key."""
    def fail(key, what):
        raise TableError(f"tuning table {path}: {key}: {what}")

    if not isinstance(data, dict):
        fail("(top level)", f"expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        fail("format", f"expected {FORMAT}, got {data.get('format')!r}")
    devices = data.get("devices")
    if not isinstance(devices, list):
        fail("devices", f"expected a list of entries, got {devices!r}")
    for i, entry in enumerate(devices):
        at = f"devices[{i}]"
        if not isinstance(entry, dict):
            fail(at, "expected an object")
        for key in ("device", "torch", "triton"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                fail(f"{at}.{key}", f"expected a non-empty string, got {entry.get(key)!r}")
        unknown = set(entry) - {"device", "torch", "triton", "backend", "impl", "tiles", "measured"}
        if unknown:
            fail(f"{at}.{sorted(unknown)[0]}", "unknown key; expected device, torch, triton, backend, impl, "
                                               "tiles, measured")
        if "backend" in entry and entry["backend"] not in BACKENDS:
            fail(f"{at}.backend", f"expected one of {BACKENDS}, got {entry['backend']!r}")
        for cls, uses in (entry.get("impl") or {}).items():
            if not _CLASS.match(cls):
                fail(f"{at}.impl[{cls!r}]", "not a shape class like '16bit/3m/n>4096'")
            if not isinstance(uses, dict):
                fail(f"{at}.impl[{cls!r}]", f"expected an object of {USES}")
            for use, impl in uses.items():
                if use not in USES:
                    fail(f"{at}.impl[{cls!r}].{use}", f"expected one of {USES}")
                if impl not in IMPLS:
                    fail(f"{at}.impl[{cls!r}].{use}", f"expected one of {IMPLS}, got {impl!r}")
        tiles = entry.get("tiles") or {}
        if not isinstance(tiles, dict):
            fail(f"{at}.tiles", "expected an object of kernels")
        for kernel, by_class in tiles.items():
            if kernel not in KERNELS:
                fail(f"{at}.tiles.{kernel}", f"unknown kernel; expected one of {KERNELS}")
            if not isinstance(by_class, dict):
                fail(f"{at}.tiles.{kernel}", "expected an object of shape classes")
            for cls, cfg in by_class.items():
                if not _CLASS.match(cls):
                    fail(f"{at}.tiles.{kernel}[{cls!r}]", "not a shape class like '16bit/3m/n>4096'")
                _check_tiles(kernel, cfg, f"tuning table {path}: {at}.tiles.{kernel}[{cls!r}]")
    return data


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TableError(f"tuning table {path}: cannot be read: {exc}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise TableError(f"tuning table {path}: (top level): not valid JSON: {exc}") from exc
    return validate(data, path)


def load(path=None) -> dict:
    """The validated table at `path` (default: the one in use); an empty table if there is none."""
    path = table_path() if path is None else Path(path)
    if path is None or (path == TABLE_PATH and not path.exists()):  # an install without the data file: defaults
        return {"format": FORMAT, "devices": []}
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as exc:
        raise TableError(f"tuning table {path}: cannot be read: {exc}") from exc
    return _load_cached(str(path), mtime)


def entry(device, *, table=None, name=None):
    """The table's entry for `device` (or the device called `name`) under this torch / triton, or None."""
    data = load() if table is None else table
    name = device_name(device) if name is None else name
    ver = versions()
    for e in data["devices"]:
        if e["device"] == name and _major_minor(e["torch"]) == ver["torch"] and _major_minor(e["triton"]) == ver["triton"]:
            return e
    return None


def tiles(kernel: str, device, dtype: torch.dtype, models: int, n: int) -> dict:
    """Launch parameters the table holds for `kernel` at this shape class on `device` ({} = the defaults)."""
    if kernel in _forced:
        return dict(_forced[kernel])
    e = entry(device)
    if e is None:
        return {}
    return dict((e.get("tiles") or {}).get(kernel, {}).get(shape_class(dtype, models, n), {}))


def stages(cfg: dict) -> dict:
    """The num_stages launch option, where `cfg` sets one (else Triton's default)."""
    return {"num_stages": cfg["num_stages"]} if "num_stages" in cfg else {}


def preferred(device, candidates: tuple) -> tuple:
    """`candidates` with the table's backend for `device` moved first (unchanged without an entry)."""
    e = entry(device)
    best = None if e is None else e.get("backend")
    if best not in candidates:
        return candidates
    return (best,) + tuple(c for c in candidates if c != best)


def fused_impl(device, dtype: torch.dtype, models: int, n: int, use: str) -> str:
    """"onchip" where the table says the on-chip kernels won for `use` (one of USES) at this shape
    class on `device`, else "chunked" (the default)."""
    if use not in USES:
        raise ValueError(f"use: expected one of {USES}, got {use!r}")
    e = entry(device)
    if e is None:
        return "chunked"
    return (e.get("impl") or {}).get(shape_class(dtype, models, n), {}).get(use, "chunked")


@contextlib.contextmanager
def forced(by_kernel: dict):
    """Within the block, `tiles(kernel, ...)` returns by_kernel[kernel] for the kernels it names (the
    autotuner times candidates through the public entry points this way). Not thread-safe."""
    for kernel, cfg in by_kernel.items():
        if kernel not in KERNELS:
            raise ValueError(f"by_kernel: unknown kernel {kernel!r}; expected some of {KERNELS}")
        _check_tiles(kernel, cfg, f"forced {kernel}")
    saved = dict(_forced)
    _forced.update(by_kernel)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def with_entry(data: dict, new: dict) -> dict:
    """A copy of table `data` with `new` in place of any entry for the same device and versions."""
    same = (new["device"], _major_minor(new["torch"]), _major_minor(new["triton"]))
    kept = [e for e in data["devices"]
            if (e["device"], _major_minor(e["torch"]), _major_minor(e["triton"])) != same]
    return {**data, "format": FORMAT, "devices": kept + [new]}


def write(path, data: dict) -> Path:
    """Validates `data` and writes it to `path` (sorted keys, one key per line: reviewable diffs)."""
    path = Path(path)
    validate(data, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path
