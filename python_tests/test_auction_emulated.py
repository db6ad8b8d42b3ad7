"""The CUDA auction's device code, run on the CPU, against its CPU twin.

cuda_emu/ compiles csrc/cuda/auction_cuda.cu's kernels with g++ and runs each CUDA thread as a
std::thread (barriers for __syncthreads, grid syncs and warp shuffles/votes), linked with the
CPU twin built from the same sources and constants. It checks the kernels' logic on machines
without a GPU: the same assignment, status and round count as the twin (and as the installed
``_C.solve_auction``), bit for bit. It cannot see what only hardware shows (the memory model,
shared-memory capacity, timing); the ``cuda`` tests in test_auction.py cover those on a GPU.
"""
import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from loom_kernels import _native
from loom_kernels.testing import ASSIGN_FAMILIES, assignment_problem

_HERE = Path(__file__).resolve().parent
_CSRC = _HERE.parent / "csrc"


# Builds: the shipped constants, and the Δ-stepping window of the path finish switched on for
# every size (it starts at 1024 rows otherwise, too large to emulate).
_BUILDS = {"default": [], "window": ["-DLOOM_AUCTION_SAP_WINDOW_ROWS=1"]}


def _build(tmp_dir, name):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or not (_CSRC / "cuda" / "auction_cuda.cu").exists():
        pytest.skip("needs a C++20 compiler and the csrc/ sources (a source checkout)")
    so = tmp_dir / f"auction_emu_{name}.so"
    cmd = [cxx, "-O1", "-std=c++20", "-pthread", "-shared", "-fPIC", f"-I{_HERE / 'cuda_emu'}", f"-I{_CSRC}",
           *_BUILDS[name], str(_HERE / "cuda_emu" / "auction_emu.cpp"), str(_CSRC / "cpu" / "auction_cpu.cpp"),
           "-o", str(so)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    return ctypes.CDLL(str(so))


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def _outputs(B, N):
    return np.full((B, N), -7, np.int64), np.full(B, -1, np.int8), np.full(B, -1, np.int64)


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda_emu")
    return {name: _build(tmp, name) for name in _BUILDS}


def _emu(lib, cost, maximize=False, tol=1e-9, mode=1, threads=64, blocks=2):
    """The kernels on (B, N, M) cost -> (col4row, status, rounds); mode 1 one block per problem,
    3 the cooperative kernel with `blocks` blocks; `threads` per block."""
    B, N, M = cost.shape
    col, st, rounds = _outputs(B, N)
    lib.emu_solve(_ptr(cost), ctypes.c_int(cost.dtype == np.float64), ctypes.c_int64(B), ctypes.c_int64(N),
                  ctypes.c_int64(M), ctypes.c_int(bool(maximize)), ctypes.c_double(tol), ctypes.c_int(mode),
                  ctypes.c_int(threads), ctypes.c_int(blocks), _ptr(col), _ptr(st), _ptr(rounds))
    return col, st, rounds


def _twin(lib, cost, maximize=False, tol=1e-9):
    B, N, M = cost.shape
    col, st, rounds = _outputs(B, N)
    lib.twin_solve(_ptr(cost), ctypes.c_int(cost.dtype == np.float64), ctypes.c_int64(B), ctypes.c_int64(N),
                   ctypes.c_int64(M), ctypes.c_int(bool(maximize)), ctypes.c_double(tol), _ptr(col), _ptr(st),
                   _ptr(rounds))
    return col, st, rounds


def _assert_twin(libs, cost, maximize=False, tol=1e-9, build="default", **kw):
    """The emulated kernels equal the CPU twin of the same build; for the shipped constants the
    twin is also the installed ``_C.solve_auction``."""
    cost = np.ascontiguousarray(cost)
    lib = libs[build]
    ref = _twin(lib, cost, maximize, tol)
    if build == "default":
        installed = _native.cpu().solve_auction(cost, maximize, tol, 1, True)
        for x, y in zip(ref, installed):
            np.testing.assert_array_equal(x, y, err_msg="csrc/ and the installed _C disagree: rebuild")
    got = _emu(lib, cost, maximize, tol, **kw)
    for name, x, y in zip(("col4row", "status", "rounds"), got, ref):
        np.testing.assert_array_equal(x, y, err_msg=f"emulated kernel ({build}, {kw}) differs from the twin in {name}")
    return got


# Shapes: square (bidding + path finish), N <= 0.7 M (paths only), 0.7 M < N < M (bidding with
# dummies + path finish).
@pytest.mark.parametrize("shape", [(24, 24), (18, 40), (30, 34)])
@pytest.mark.parametrize("family", ASSIGN_FAMILIES)
def test_emulated_block_kernel_matches_twin(libs, family, shape, rng):
    dtype = np.float32 if family in ("uniform", "sq_high") else np.float64
    cost = assignment_problem(family, *shape, batch=2, rng=rng, dtype=dtype)
    tol = 0.0 if family == "int_ties" else 1e-9
    _, st, _ = _assert_twin(libs, cost, tol=tol)
    assert (st == 0).all()


@pytest.mark.parametrize("family", ["uniform", "int_ties", "sq_low", "huge_range"])
def test_emulated_window_build_matches_twin(libs, family, rng):
    cost = assignment_problem(family, 28, batch=2, rng=rng)
    _, st, _ = _assert_twin(libs, cost, tol=0.0 if family == "int_ties" else 1e-9, build="window")
    assert (st == 0).all()


@pytest.mark.parametrize("family", ["uniform", "int_ties", "sq_low"])
def test_emulated_grid_kernel_matches_twin(libs, family, rng):
    cost = assignment_problem(family, 26, 30, batch=1, rng=rng)
    _assert_twin(libs, cost, tol=0.0 if family == "int_ties" else 1e-9, mode=3, threads=64, blocks=2)


def test_emulated_edge_cases_match_twin(libs, rng):
    # maximize; +inf feasible / infeasible; NaN; 1 x 1; identical rows over a huge range (the
    # phase's round budget); more rows than one pass of the warps' ballots covers (m > 64).
    cases = [(rng.standard_normal((1, 20, 20)), True, {})]
    c = rng.random((1, 20, 20))
    c[rng.random(c.shape) < 0.5] = np.inf
    c[0, np.arange(20), rng.permutation(20)] = 0.5
    cases.append((c, False, {}))
    c = rng.random((1, 10, 10))
    c[0, 3:, 4:] = np.inf
    cases.append((c, False, {}))
    c = rng.random((1, 9, 9))
    c[0, 2, 2] = np.nan
    cases.append((c, False, {}))
    cases.append((rng.random((1, 1, 1)), False, {}))
    cases.append((np.tile(assignment_problem("huge_range", 1, 11, rng=rng), (1, 9, 1)), False, {}))
    cases.append((assignment_problem("uniform", 12, 70, batch=1, rng=rng), False, {"threads": 32}))
    for cost, maximize, kw in cases:
        _assert_twin(libs, cost, maximize=maximize, **kw)
