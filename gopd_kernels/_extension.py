"""The C++/CUDA extension ``gopd_kernels._C``: one CMake build, run against the torch that will load it.

Two ways to get it, one build rule (``CMakeLists.txt``, driven by ``cmake_build`` below):

- **Up front**: ``pip install --no-build-isolation -e .`` (and ``make``) build it into the package while
  installing, against the environment's torch (``setup.py`` calls ``cmake_build``).
- **On first use**: a plain ``pip install .`` cannot see the environment's torch (pip builds in an
  isolated environment), so it installs no extension, only its sources (``gopd_kernels/_src``). The
  first call that needs the C++ (or CUDA) backend builds it with CMake + ninja against the running
  torch, into ``$GOPD_CACHE_DIR/extension/<torch version, CUDA, Python, source hash>/`` (default cache
  ``~/.cache/gopd``), and later processes load it from there. A file lock makes concurrent first uses
  (torchrun ranks, test workers) build once.

``GOPD_BUILD_EXTENSION=0`` turns the build on first use off. Where no build is possible (no compiler,
no cmake), ``load`` raises ImportError with the reason; the backends report it and ``backend="auto"``
falls back to the plain-torch backend with a warning. Build knobs (both ways): ``GOPD_BUILD_CUDA=0/1``
(default: on when torch has CUDA and nvcc is found), ``GOPD_CUDA_ARCHS`` (e.g. "80;90"), ``MAX_JOBS``
(parallel compile jobs, default 2), ``GOPD_BUILD_TYPE`` (default Release).

This file imports nothing of gopd_kernels and imports torch only inside functions, so ``setup.py`` can
load it by path in a build environment that has no torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

EXT_NAME = "_C"
MODULE = f"gopd_kernels.{EXT_NAME}"
_HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------- the build
def find_nvcc() -> Optional[str]:
    if os.environ.get("CUDACXX") and Path(os.environ["CUDACXX"]).exists():
        return os.environ["CUDACXX"]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def find_tool(name: str) -> str:
    """cmake / ninja: from their PyPI wheels if installed, else from PATH."""
    try:
        module = __import__(name)
        bin_dir = getattr(module, "CMAKE_BIN_DIR", None) or getattr(module, "BIN_DIR")
        exe = Path(bin_dir) / name
        if exe.exists():
            return str(exe)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"`{name}` not found: `pip install {name}` (or install it with the system package manager)")
    return found


def with_cuda(torch) -> tuple:
    """(build the CUDA kernels?, nvcc path). GOPD_BUILD_CUDA forces the choice."""
    nvcc = find_nvcc()
    has_cuda_torch = torch.version.cuda is not None
    want = os.environ.get("GOPD_BUILD_CUDA")
    if want is None:
        return has_cuda_torch and nvcc is not None, nvcc
    on = want not in ("0", "", "off", "OFF", "false")
    if on and not (has_cuda_torch and nvcc):
        raise RuntimeError("GOPD_BUILD_CUDA=1 needs a CUDA build of torch and nvcc")
    return on, nvcc


def cmake_build(source_root: Path, out_dir: Path, build_dir: Path, *, version: str, debug: bool = False,
                log=None) -> Path:
    """Configure and build CMakeLists.txt in `source_root` against the running torch; the module lands in
    `out_dir` (returned: its path). `log`: a file object for CMake's output (default: inherited)."""
    import torch  # the running torch: the extension is built against it and no other

    cuda, nvcc = with_cuda(torch)
    cfg = os.environ.get("GOPD_BUILD_TYPE", "Debug" if debug else "Release")
    args = [
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        f"-DPython3_EXECUTABLE={sys.executable}",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DCMAKE_BUILD_TYPE={cfg}",
        f"-DGOPD_EXT_NAME={EXT_NAME}",
        f"-DGOPD_VERSION={version}",
        f"-DGOPD_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-DGOPD_WITH_CUDA={'ON' if cuda else 'OFF'}",
        # Empty: TORCH_CUDA_ARCH_LIST from the environment if set, else 80;90 (CMakeLists.txt).
        f"-DGOPD_CUDA_ARCHS={os.environ.get('GOPD_CUDA_ARCHS', '')}",
    ]
    if cuda:
        args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    else:
        # A CPU-only torch must not go looking for CUDA even where nvcc exists.
        args.append("-DCMAKE_DISABLE_FIND_PACKAGE_CUDA=ON")
    try:
        ninja = find_tool("ninja")
        args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    except RuntimeError:
        pass  # CMake's default generator
    out_dir.mkdir(parents=True, exist_ok=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    cmake = find_tool("cmake")
    jobs = os.environ.get("MAX_JOBS", "2")
    for cmd in ([cmake, str(source_root), *args], [cmake, "--build", ".", "--config", cfg, "-j", jobs]):
        subprocess.run(cmd, cwd=build_dir, check=True, stdout=log, stderr=subprocess.STDOUT if log else None)
    built = sorted(out_dir.glob(f"{EXT_NAME}.*.so"), key=lambda p: p.stat().st_mtime)
    if not built:
        raise RuntimeError(f"CMake did not produce {EXT_NAME}*.so in {out_dir}")
    return built[-1]


# ------------------------------------------------------------------------------------- build on first use
def source_root() -> Optional[Path]:
    """Where CMakeLists.txt and csrc/ are: shipped in the package (_src) or, in a checkout, one level up."""
    for root in (_HERE / "_src", _HERE.parent):
        if (root / "CMakeLists.txt").is_file() and (root / "csrc").is_dir():
            return root
    return None


def source_hash(root: Path) -> str:
    """Hash of every file the build reads (CMakeLists.txt and csrc/), names and contents."""
    digest = hashlib.sha256()
    files = [root / "CMakeLists.txt", *sorted(p for p in (root / "csrc").rglob("*") if p.is_file())]
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("GOPD_CACHE_DIR") or Path.home() / ".cache" / "gopd") / "extension"


def build_key(root: Path) -> str:
    """The cache folder's name: one build per torch version, CUDA version, Python and source state."""
    import torch

    cuda = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return f"torch{torch.__version__.replace('+', '_')}-{cuda}-{py}-{source_hash(root)}"


def package_version() -> str:
    import re

    match = re.search(r'^__version__\s*=\s*"([^"]+)"', (_HERE / "__init__.py").read_text(), re.M)
    return match.group(1) if match else "0.0.0"


def _import_from(path: Path):
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[MODULE]
        raise
    return module


def _build_cached(root: Path, target: Path) -> Path:
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
        built = sorted(target.glob(f"{EXT_NAME}.*.so"))
        if built:
            return built[0]
        import torch

        staging = target.parent / f"{target.name}.tmp{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        print(f"gopd: building the C++ extension against torch {torch.__version__} (first use; about a minute, "
              f"several with CUDA kernels) into {target}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        log_path = staging / "build.log"
        try:
            with open(log_path, "w") as log:
                cmake_build(root, staging, staging / "build", version=package_version(), log=log)
        except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
            tail = log_path.read_text(errors="replace").splitlines()[-25:] if log_path.exists() else []
            shutil.rmtree(staging, ignore_errors=True)
            raise ImportError(f"building the C++ extension failed ({exc}); last lines of the build log:\n"
                              + "\n".join(tail)) from exc
        shutil.rmtree(staging / "build", ignore_errors=True)  # keep only the module and its log
        staging.rename(target)
        print(f"gopd: built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        return sorted(target.glob(f"{EXT_NAME}.*.so"))[0]


def load():
    """The module gopd_kernels._C: the one installed with the package, else a cached build for this torch
    and these sources, else built now (unless GOPD_BUILD_EXTENSION=0). Raises ImportError saying why not."""
    if MODULE in sys.modules:
        return sys.modules[MODULE]
    try:
        return importlib.import_module(MODULE)
    except ImportError as exc:  # not installed, or built against another torch
        installed_error = exc
    root = source_root()
    if root is None:
        raise ImportError(f"{MODULE} is not installed ({installed_error}) and its sources are not shipped "
                          "with this install, so it cannot be built on first use")
    target = cache_root() / build_key(root)
    built = sorted(target.glob(f"{EXT_NAME}.*.so"))
    if not built:
        if os.environ.get("GOPD_BUILD_EXTENSION", "1") == "0":
            raise ImportError(f"{MODULE} is not installed ({installed_error}) and GOPD_BUILD_EXTENSION=0 turns "
                              "off its build on first use")
        built = [_build_cached(root, target)]
    return _import_from(built[0])


def not_built_message(exc: BaseException) -> str:
    """Why the extension is not there, and how to get it."""
    return (f"the C++ extension gopd_kernels._C could not be loaded or built here ({type(exc).__name__}: {exc}); "
            "it needs a C++ compiler, cmake and ninja (`pip install cmake ninja`), or build it up front with "
            "`pip install --no-build-isolation -e .` (or `make test`)")


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m gopd_kernels._extension`: build (or find) the extension now and print where it is."""
    module = load()
    print(module.__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
