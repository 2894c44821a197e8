"""Build of gopd_kernels (+ the gopd trainer package) and the C++/CUDA extension gopd_kernels._C.

The extension is built by CMake (pybind11's cmake pattern: a CMakeExtension with no sources and a
build_ext that runs cmake + ninja) against the torch that is already installed, so install with

    pip install --no-build-isolation -e .

(build isolation would download a separate multi-GB torch and build against the wrong one).
Environment knobs: GOPD_BUILD_CUDA=0/1 forces the CUDA part off/on (default: on when torch has CUDA
and nvcc is found), GOPD_CUDA_ARCHS (e.g. "80;90"; default: TORCH_CUDA_ARCH_LIST if set, else
"80;90"; handed to torch's CMake as TORCH_CUDA_ARCH_LIST), MAX_JOBS (parallel compile jobs, default 2),
GOPD_BUILD_TYPE (default Release).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    text = (ROOT / "gopd_kernels" / "__init__.py").read_text()
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M)
    return match.group(1) if match else "0.0.0"


class CMakeExtension(Extension):
    """An extension built by CMakeLists.txt in `sourcedir` (no sources of its own for setuptools)."""

    def __init__(self, name: str, sourcedir: str = "."):
        super().__init__(name, sources=[])
        self.sourcedir = str((ROOT / sourcedir).resolve())


def _find_nvcc() -> str | None:
    for env in ("CUDACXX",):
        if os.environ.get(env) and Path(os.environ[env]).exists():
            return os.environ[env]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def _tool(name: str) -> str:
    """cmake / ninja from the PyPI wheels if installed, else from PATH."""
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


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import torch  # the installed torch: build against it, never an isolated copy

        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = out_path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        ext_name = ext.name.split(".")[-1]

        want_cuda = os.environ.get("GOPD_BUILD_CUDA")
        nvcc = _find_nvcc()
        has_cuda_torch = torch.version.cuda is not None
        if want_cuda is None:
            with_cuda = has_cuda_torch and nvcc is not None
        else:
            with_cuda = want_cuda not in ("0", "", "off", "OFF", "false")
            if with_cuda and not (has_cuda_torch and nvcc):
                raise RuntimeError("GOPD_BUILD_CUDA=1 needs a CUDA build of torch and nvcc")

        cfg = os.environ.get("GOPD_BUILD_TYPE", "Debug" if self.debug else "Release")
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DGOPD_EXT_NAME={ext_name}",
            f"-DGOPD_VERSION={read_version()}",
            f"-DGOPD_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DGOPD_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            # Empty: TORCH_CUDA_ARCH_LIST from the environment if set, else 80;90 (CMakeLists.txt).
            f"-DGOPD_CUDA_ARCHS={os.environ.get('GOPD_CUDA_ARCHS', '')}",
        ]
        if with_cuda:
            cmake_args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        else:
            # A CPU-only torch must not go looking for CUDA even where nvcc exists.
            cmake_args.append("-DCMAKE_DISABLE_FIND_PACKAGE_CUDA=ON")
        try:
            ninja = _tool("ninja")
            cmake_args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        except RuntimeError:
            pass  # fall back to CMake's default generator

        build_temp = Path(self.build_temp).resolve() / ext_name
        build_temp.mkdir(parents=True, exist_ok=True)
        cmake = _tool("cmake")
        jobs = os.environ.get("MAX_JOBS", "2")
        subprocess.run([cmake, ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)
        # CMake names the module with the interpreter's SOABI; make sure setuptools finds it where it expects.
        if not out_path.exists():
            built = sorted(out_dir.glob(f"{ext_name}*.so"), key=lambda p: p.stat().st_mtime)
            if not built:
                raise RuntimeError(f"CMake did not produce {out_path}")
            shutil.copy2(built[-1], out_path)


setup(
    version=read_version(),
    # gopd_kernels lives at the repository root, the trainer package gopd under python/.
    packages=find_packages(include=["gopd_kernels", "gopd_kernels.*"])
    + find_packages(where="python", include=["gopd", "gopd.*"]),
    package_dir={"gopd": "python/gopd"},
    ext_modules=[CMakeExtension("gopd_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
