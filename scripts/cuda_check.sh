#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc, compile-only, for sm_80 and sm_90, and print ptxas'
# register / spill report per kernel. Fails (non-zero exit) if nvcc fails on any file or if any
# kernel spills registers to local memory. Needs nvcc only: no GPU, no CUDA build of torch.
#
# Then, when a Python with torch is given (GOPD_PYTHON), the host bindings (csrc/cuda/*.cpp) are
# compiled syntax-only against that torch's headers and the CUDA headers nvcc uses, so a binding that
# no longer matches torch's C++ API fails here and not first on a GPU machine. (A CPU wheel of torch
# ships c10/cuda headers but not the one CMake generates, c10/cuda/impl/cuda_cmake_macros.h; a
# one-line stand-in is written for this check.)
#
# Then, with that Python, the extension's real CMake configure step runs with its CUDA part on
# (GOPD_WITH_CUDA=ON, GOPD_CUDA_ARCHS="80;90", this nvcc) against that torch, without a GPU: the nvcc
# command line CMake generates for csrc/cuda/rows.cu must target exactly sm_80 and sm_90, and that
# object is then built through it. (A CPU wheel of torch does not run torch's CUDA CMake, which is what
# reads TORCH_CUDA_ARCH_LIST in a CUDA wheel; CMakeLists.txt then runs torch's own architecture
# selection, torch_cuda_get_nvcc_gencode_flag, on the same list, so the list takes the same path.
# Linking the CUDA extension needs a CUDA build of torch: that is left to a GPU machine.)
#
# Environment: NVCC (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc), NVCC_FLAGS (extra flags),
# GOPD_PYTHON (a python that imports torch; unset: the bindings check and the CMake configure are
# skipped with a message), CMAKE (default: cmake next to GOPD_PYTHON, else on PATH).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc="$(command -v nvcc)"
  elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    nvcc="$CUDA_HOME/bin/nvcc"
  else
    echo "cuda-check: nvcc not found (put it on PATH or set NVCC / CUDA_HOME)" >&2
    exit 2
  fi
fi

shopt -s nullglob
sources=("$root"/csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "cuda-check: no csrc/cuda/*.cu files found" >&2
  exit 2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "cuda-check: $("$nvcc" --version | tail -n 1)"
status=0
spills=0
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  log="$tmp/$name.log"
  echo "== $name.cu"
  start=$SECONDS
  # shellcheck disable=SC2086
  if ! "$nvcc" -c "$src" -o "$tmp/$name.o" -I"$root/csrc" -O3 -std=c++17 -Xptxas -v \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      ${NVCC_FLAGS:-} >"$log" 2>&1; then
    cat "$log"
    echo "cuda-check: FAILED to compile $name.cu" >&2
    status=1
    continue
  fi
  # ptxas -v prints, per kernel and arch: "Compiling entry function '<mangled>' for 'sm_XX'",
  # then "N bytes stack frame, N bytes spill stores, N bytes spill loads" and "Used N registers".
  # Print one line per kernel: arch, registers, stack / spill bytes, demangled name.
  awk '
    /Compiling entry function/ {
      match($0, /function .[^'"'"']*/); fn = substr($0, RSTART + 10, RLENGTH - 10)
      match($0, /for .sm_[0-9]+/); arch = substr($0, RSTART + 5, RLENGTH - 5)
    }
    /bytes stack frame/ { frame = $0; sub(/^.*ptxas info *: */, "", frame) }
    /Used [0-9]+ registers/ {
      match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15)
      printf "%s regs=%-3s %s | %s\n", arch, regs, frame, fn
    }' "$log" | while IFS= read -r line; do
        fn="${line##*| }"
        demangled="$(echo "$fn" | c++filt 2>/dev/null || echo "$fn")"
        echo "  ${line%%| *}| $demangled"
      done
  # Any other warnings nvcc printed (ptxas info lines excluded).
  grep -v -e 'ptxas info' -e 'bytes stack frame' -e '^ *$' "$log" || true
  n_spill="$(grep -Eo '[1-9][0-9]* bytes spill (stores|loads)' "$log" | wc -l || true)"
  if [[ "$n_spill" -gt 0 ]]; then
    echo "cuda-check: $name.cu has kernels that spill registers (see above)" >&2
    spills=1
  fi
  echo "  compiled in $((SECONDS - start)) s"
done

bindings=("$root"/csrc/cuda/*.cpp)
py="${GOPD_PYTHON:-}"
if [[ ${#bindings[@]} -eq 0 ]]; then
  :
elif [[ -z "$py" ]] || ! "$py" -c "import torch" >/dev/null 2>&1; then
  echo "cuda-check: GOPD_PYTHON with torch not given: skipping the syntax check of the host bindings"
else
  cuda_inc="$("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)"
  mapfile -t torch_flags < <("$py" -c "
import torch, torch.utils.cpp_extension as c
for p in c.include_paths(): print('-I' + p)
print('-D_GLIBCXX_USE_CXX11_ABI=%d' % int(torch._C._GLIBCXX_USE_CXX11_ABI))")
  shim="$tmp/shim"
  mkdir -p "$shim/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$shim/c10/cuda/impl/cuda_cmake_macros.h"
  for src in "${bindings[@]}"; do
    echo "== $(basename "$src") (host, syntax only, torch $("$py" -c 'import torch; print(torch.__version__)'))"
    # The shim goes last: a real generated header (CUDA torch) wins.
    if ! "${CXX:-c++}" -std=c++17 -fsyntax-only -Wall -Wno-c++20-extensions "${torch_flags[@]}" \
        -I"$cuda_inc" -I"$root/csrc" -I"$root/csrc/cuda" -idirafter "$shim" "$src"; then
      echo "cuda-check: FAILED to compile $(basename "$src")" >&2
      status=1
    fi
  done
fi

if [[ -n "$py" ]] && "$py" -c "import torch" >/dev/null 2>&1; then
  pybin="$(cd "$(dirname "$py")" && pwd)"  # absolute: CMake runs the tools from other directories
  cmake_bin="${CMAKE:-}"
  if [[ -z "$cmake_bin" ]]; then
    if [[ -x "$pybin/cmake" ]]; then cmake_bin="$pybin/cmake"; else cmake_bin="$(command -v cmake || true)"; fi
  fi
  ninja_bin="$pybin/ninja"
  [[ -x "$ninja_bin" ]] || ninja_bin="$(command -v ninja || true)"
  if [[ -z "$cmake_bin" || -z "$ninja_bin" ]]; then
    echo "cuda-check: cmake or ninja not found: skipping the CMake configure of the CUDA extension"
  else
    echo "== CMake configure with GOPD_WITH_CUDA=ON, GOPD_CUDA_ARCHS=80;90 ($("$cmake_bin" --version | head -n 1))"
    bdir="$tmp/cmake"
    start=$SECONDS
    if ! "$cmake_bin" -S "$root" -B "$bdir" -G Ninja -DCMAKE_MAKE_PROGRAM="$ninja_bin" -DGOPD_WITH_CUDA=ON \
        -DGOPD_CUDA_ARCHS="80;90" -DCMAKE_CUDA_COMPILER="$nvcc" -DPython3_EXECUTABLE="$pybin/$(basename "$py")" \
        -DCMAKE_PREFIX_PATH="$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
        >"$tmp/configure.log" 2>&1; then
      tail -n 40 "$tmp/configure.log"
      echo "cuda-check: FAILED: CMake configure with the CUDA part" >&2
      status=1
    else
      grep -E "gopd: CUDA architectures" "$tmp/configure.log" | sed 's/^-- /  /'
      obj="CMakeFiles/gopd_ext.dir/csrc/cuda/rows.cu.o"
      cmd="$("$ninja_bin" -C "$bdir" -t commands "$obj" | tail -n 1)"
      archs="$(grep -Eo 'arch=compute_[0-9]+[af]?,code=[a-z_0-9]+' <<<"$cmd" | sort -u | tr '\n' ' ')"
      echo "  nvcc targets from CMake: $archs"
      if [[ "$archs" != "arch=compute_80,code=sm_80 arch=compute_90,code=sm_90 " ]]; then
        echo "cuda-check: FAILED: CMake's nvcc command for rows.cu does not target exactly sm_80 + sm_90:" >&2
        echo "$cmd" >&2
        status=1
      elif ! "$ninja_bin" -C "$bdir" "$obj" >"$tmp/build.log" 2>&1; then
        tail -n 40 "$tmp/build.log"
        echo "cuda-check: FAILED: building rows.cu through the CMake build" >&2
        status=1
      else
        echo "  rows.cu built through CMake in $((SECONDS - start)) s (configure included)"
      fi
    fi
  fi
else
  echo "cuda-check: GOPD_PYTHON with torch not given: skipping the CMake configure of the CUDA extension"
fi

if [[ $status -ne 0 ]]; then
  exit 1
fi
if [[ $spills -ne 0 ]]; then
  exit 1
fi
echo "cuda-check: OK (${#sources[@]} kernel file(s), sm_80 + sm_90, zero spills; ${#bindings[@]} host binding file(s); CMake configure)"
