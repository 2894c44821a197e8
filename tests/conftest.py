"""Test-wide settings: deterministic hypothesis profile, Triton's interpreter where there is no GPU."""

import os

import torch

# Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")


@pytest.fixture(scope="session")
def emulated_cuda(tmp_path_factory):
    """The CUDA kernels' row math built for the host (tests/cuda_emulation.py), once per session."""
    from cuda_emulation import build, nvcc

    if nvcc() is None:
        pytest.skip("nvcc not found: the host emulation of the CUDA row math needs it")
    return build(tmp_path_factory.mktemp("gopd_emu"))
