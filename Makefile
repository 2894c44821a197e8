# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs torch + the project, builds the extension, runs the main job
#   make test   the same bootstrap, then the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU wheel where there is no GPU; where the system Python already has torch, the venv sees it.
TORCH_CPU := torch==2.13.0

.PHONY: demo test cuda-check bench clean

$(BIN)/.bootstrapped: setup.py pyproject.toml CMakeLists.txt
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "== using the torch already installed for $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	    $(PYTHON) -m venv $(VENV); \
	    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	        echo "== GPU found: installing the CUDA build of torch"; $(BIN)/pip install -q torch; \
	    else \
	        echo "== no GPU: installing the CPU build $(TORCH_CPU)"; $(BIN)/pip install -q $(TORCH_CPU); \
	    fi; \
	fi
	$(BIN)/pip install -q setuptools wheel pybind11 cmake ninja
	$(BIN)/pip install -q --no-build-isolation -e ".[test,train,bench]"
	@touch $@ $(BIN)/.built  # that install built the extension too

$(BIN)/.built: $(BIN)/.bootstrapped $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	@touch $@

demo: $(BIN)/.built
	$(BIN)/gopd demo

test: $(BIN)/.built
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

cuda-check: $(BIN)/.bootstrapped
	GOPD_PYTHON=$(BIN)/python bash scripts/cuda_check.sh

bench: $(BIN)/.built
	$(BIN)/python benchmarks/bench_cpu.py

clean:
	rm -rf build $(VENV) *.egg-info gopd_kernels/_C*.so
