# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs torch + the project (with the trainer's extras), builds the
#               extension, runs the main job
#   make test   the same, with the test and benchmark extras, then the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU wheel where there is no GPU; where the system Python already has torch, the venv sees it.
TORCH_CPU := torch==2.13.0
# What a rebuild of the project depends on.
SOURCES := setup.py pyproject.toml CMakeLists.txt \
           $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)

.PHONY: demo test cuda-check bench clean

# The virtual environment with torch and the build tools (once).
$(BIN)/.venv-ready:
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
	@touch $@

# The project installed in place (this builds the C++ extension) with the extras a target needs:
# the demo only the trainer's, the tests everything. Re-run when a source of the build changes.
$(BIN)/.installed-demo: $(BIN)/.venv-ready $(SOURCES)
	$(BIN)/pip install -q --no-build-isolation -e ".[train]"
	@touch $@

$(BIN)/.installed-test: $(BIN)/.venv-ready $(SOURCES)
	$(BIN)/pip install -q --no-build-isolation -e ".[test,train,bench]"
	@touch $@ $(BIN)/.installed-demo

demo: $(BIN)/.installed-demo
	$(BIN)/gopd demo

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

cuda-check: $(BIN)/.venv-ready
	GOPD_PYTHON=$(BIN)/python bash scripts/cuda_check.sh

bench: $(BIN)/.installed-test
	$(BIN)/python benchmarks/bench_cpu.py

clean:
	rm -rf build $(VENV) *.egg-info gopd_kernels/_C*.so

# One command for a fresh CUDA machine, no venv needed (issue 16): build with CUDA, GPU tests, benchmarks.
#   make gpu-check ARGS="OUT [--quick] [--liger WHEELS]"   make gpu-check --dry-run   (any machine: checks each step)
.PHONY: gpu-check
gpu-check:
	+$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/gpu_check.py $(if $(findstring n,$(firstword -$(MAKEFLAGS))),--dry-run) $(ARGS)
