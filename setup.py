"""Build of gopd_kernels (+ the gopd trainer package) and, where it can be, the extension gopd_kernels._C.

The extension is built by CMake (CMakeLists.txt) against the torch it will run with, never another:
- `pip install --no-build-isolation -e .` (and make) see the environment's torch: the extension is built
  now (gopd_kernels/_extension.py, cmake_build).
- A plain `pip install .` (or `pip install git+URL`) builds in an isolated environment that has no torch
  (pyproject.toml does not list it as a build requirement): no extension is built, its sources are
  shipped in the package (gopd_kernels/_src) and it is built on first use against the running torch.
Environment knobs: see gopd_kernels/_extension.py (GOPD_BUILD_CUDA, GOPD_CUDA_ARCHS, MAX_JOBS,
GOPD_BUILD_TYPE); GOPD_BUILD_EXTENSION=0 skips the build here too.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _extension_module():
    """gopd_kernels/_extension.py, loaded by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("_gopd_extension", ROOT / "gopd_kernels" / "_extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXT = _extension_module()


def _torch_here() -> bool:
    return importlib.util.find_spec("torch") is not None


class CMakeExtension(Extension):
    """An extension built by CMakeLists.txt (no sources of its own for setuptools)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        built = EXT.cmake_build(ROOT, out_path.parent, Path(self.build_temp).resolve() / EXT.EXT_NAME,
                                version=EXT.package_version(), debug=bool(self.debug))
        if built != out_path:  # CMake names the module with the interpreter's SOABI
            shutil.copy2(built, out_path)


class BuildPyWithSources(build_py):
    """Ships CMakeLists.txt and csrc/ inside the package (gopd_kernels/_src) for the build on first use."""

    def run(self):
        super().run()
        dest = Path(self.build_lib) / "gopd_kernels" / "_src"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(ROOT / "csrc", dest / "csrc")
        shutil.copy2(ROOT / "CMakeLists.txt", dest / "CMakeLists.txt")


# Built now only where this build sees a torch (no build isolation); otherwise on first use.
BUILD_NOW = _torch_here() and os.environ.get("GOPD_BUILD_EXTENSION", "1") != "0"

setup(
    version=EXT.package_version(),
    # gopd_kernels lives at the repository root, the trainer package gopd under python/.
    packages=find_packages(include=["gopd_kernels", "gopd_kernels.*"])
    + find_packages(where="python", include=["gopd", "gopd.*"]),
    package_dir={"gopd": "python/gopd"},
    # The per-device tuning table (gopd_kernels/tuning.py reads it; make gpu-check writes it).
    package_data={"gopd_kernels": ["tuning.json"]},
    ext_modules=[CMakeExtension(EXT.MODULE)] if BUILD_NOW else [],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithSources},
    zip_safe=False,
)
