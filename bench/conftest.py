"""Benchmarks: GPU cases carry the `cuda` marker and skip without a GPU (see python_tests/conftest)."""
import numpy as np
import pytest

from loom_kernels.testing import skip_cuda_items_without_gpu


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip_cuda_items_without_gpu(items)
