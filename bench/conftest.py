"""Benchmarks: GPU cases carry the `cuda` marker and skip without a GPU (see python_tests/conftest)."""
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    from loom_kernels.testing import gpu_available

    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and loom_kernels built with CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
