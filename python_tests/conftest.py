"""Shared fixtures: every test is seeded; the GPU gate (gpu_gate.py) runs, skips or fails `cuda` tests."""

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

import gpu_gate  # noqa: E402 - after the choice above


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


_GATE = pytest.StashKey()
_cuda_passed = [0]  # cuda tests passed this session (pytest_runtest_logreport gets no config)
_cuda_skipped = []  # (test id, reason) of the cuda tests skipped this session


def pytest_collection_modifyitems(config, items):
    # `cuda` items skip where no GPU (or, for all but triton_only ones, no CUDA build) can run them, and
    # fail where a GPU is visible but the CUDA build is broken (gpu_gate.decide has the rules).
    gate = config.stash[_GATE] = gpu_gate.decide(gpu_gate.probe())
    _cuda_passed[0] = 0
    _cuda_skipped.clear()
    for item in (i for i in items if "cuda" in i.keywords):
        action = gpu_gate.item_action(gate, item)
        if action is not None and action[0] == "skip":
            item.add_marker(pytest.mark.skip(reason=action[1]))


def pytest_runtest_setup(item):
    gate = item.config.stash.get(_GATE, None)
    if gate is not None and "cuda" in item.keywords:
        action = gpu_gate.item_action(gate, item)
        if action is not None and action[0] == "fail":
            pytest.fail(action[1], pytrace=False)


def pytest_runtest_logreport(report):
    if "cuda" not in report.keywords:
        return
    if report.when == "call" and report.passed:
        _cuda_passed[0] += 1
    elif report.skipped:
        lr = report.longrepr
        _cuda_skipped.append((report.nodeid, lr[2] if isinstance(lr, tuple) else str(lr)))


def pytest_sessionfinish(session, exitstatus):
    # A broken CUDA build (or a driver torch cannot use) fails any run; `-m cuda` fails when no cuda test passed
    # or one skipped without the opt-out (gpu_gate.final_status).
    gate = session.config.stash.get(_GATE, None)
    if gate is None:
        return
    status, why = gpu_gate.final_status(
        gate, session.config.getoption("markexpr") or "", _cuda_passed[0], int(exitstatus), tuple(_cuda_skipped)
    )
    if why is not None:
        session.exitstatus = status
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(why, red=True, bold=True)
