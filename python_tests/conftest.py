"""Shared fixtures: every test is seeded; `cuda` tests skip without a GPU and the CUDA build."""
import os
import random
import zlib

import numpy as np
import pytest

# Without a GPU the Triton kernels can only run in the interpreter; it must be chosen before
# triton is first imported, so it is decided here, once, for the whole session.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

from loom_kernels.testing import gpu_available  # noqa: E402 - after the choice above


@pytest.fixture(autouse=True)
def _seed_everything(request):
    # A per-test seed derived from the test id: reproducible, yet different across tests.
    env = os.environ.get("LOOM_TEST_SEED")
    seed = int(env) if env is not None else zlib.crc32(request.node.nodeid.encode()) % (2**31)
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.manual_seed(seed)
    yield


@pytest.fixture
def rng(_seed_everything):
    """A numpy Generator drawn from the test's seed."""
    return np.random.default_rng(np.random.randint(2**31))


def pytest_collection_modifyitems(config, items):
    # `cuda` items skip where no GPU (or no CUDA build) can run them.
    if not gpu_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU and loom_kernels built with CUDA")
        for item in (i for i in items if "cuda" in i.keywords):
            item.add_marker(skip)
