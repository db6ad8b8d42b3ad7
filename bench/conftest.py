"""Benchmarks: GPU cases carry the `cuda` marker and skip without a GPU (see python_tests/conftest)."""

import numpy as np
import pytest


def gpu_available() -> bool:
    """True when CUDA benchmarks can run: a visible GPU, torch with CUDA, and the CUDA build."""
    try:
        import torch

        from loom_kernels._native import has_cuda

        return torch.cuda.is_available() and has_cuda()
    except Exception:
        return False


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    # `cuda` items skip where no GPU (or no CUDA build) can run them.
    if not gpu_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU and loom_kernels built with CUDA")
        for item in (i for i in items if "cuda" in i.keywords):
            item.add_marker(skip)
