"""The CUDA auction's device code, run on the CPU, against its CPU twin.

cuda_emu/ compiles csrc/cuda/auction_cuda.cu's kernels with g++ and runs each CUDA thread as a
std::thread (barriers for __syncthreads, grid syncs and warp shuffles/votes), linked with the
CPU twin built from the same sources and constants. It checks the kernels' logic on machines
without a GPU: the same assignment, status and round count as the twin (and as the installed
``_C.solve_auction``), bit for bit. It cannot see what only hardware shows (the memory model,
shared-memory capacity, timing); the ``cuda`` tests in test_auction.py cover those on a GPU.
"""

import contextlib
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
    cmd = [
        cxx,
        "-O1",
        "-std=c++20",
        "-pthread",
        "-shared",
        "-fPIC",
        f"-I{_HERE / 'cuda_emu'}",
        f"-I{_CSRC}",
        *_BUILDS[name],
        str(_HERE / "cuda_emu" / "auction_emu.cpp"),
        str(_CSRC / "cpu" / "auction_cpu.cpp"),
        "-o",
        str(so),
    ]
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
    lib.emu_solve(
        _ptr(cost),
        ctypes.c_int(cost.dtype == np.float64),
        ctypes.c_int64(B),
        ctypes.c_int64(N),
        ctypes.c_int64(M),
        ctypes.c_int(bool(maximize)),
        ctypes.c_double(tol),
        ctypes.c_int(mode),
        ctypes.c_int(threads),
        ctypes.c_int(blocks),
        _ptr(col),
        _ptr(st),
        _ptr(rounds),
    )
    return col, st, rounds


def _twin(lib, cost, maximize=False, tol=1e-9):
    B, N, M = cost.shape
    col, st, rounds = _outputs(B, N)
    lib.twin_solve(
        _ptr(cost),
        ctypes.c_int(cost.dtype == np.float64),
        ctypes.c_int64(B),
        ctypes.c_int64(N),
        ctypes.c_int64(M),
        ctypes.c_int(bool(maximize)),
        ctypes.c_double(tol),
        _ptr(col),
        _ptr(st),
        _ptr(rounds),
    )
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
_DEFAULT_RUN = {("uniform", (24, 24)), ("int_ties", (18, 40)), ("negative", (30, 34))}  # the rest: slow


@pytest.mark.parametrize(
    "family, shape",
    [
        pytest.param(f, s, marks=() if (f, s) in _DEFAULT_RUN else pytest.mark.slow, id=f"{f}-{s[0]}x{s[1]}")
        for f in ASSIGN_FAMILIES
        for s in [(24, 24), (18, 40), (30, 34)]
    ],
)
def test_emulated_block_kernel_matches_twin(libs, family, shape, rng):
    dtype = np.float32 if family in ("uniform", "sq_high") else np.float64
    cost = assignment_problem(family, *shape, batch=2, rng=rng, dtype=dtype)
    tol = 0.0 if family == "int_ties" else 1e-9
    _, st, _ = _assert_twin(libs, cost, tol=tol)
    assert (st == 0).all()


@pytest.mark.parametrize(
    "family", ["uniform", *(pytest.param(f, marks=pytest.mark.slow) for f in ("int_ties", "sq_low", "huge_range"))]
)
def test_emulated_window_build_matches_twin(libs, family, rng):
    cost = assignment_problem(family, 28, batch=2, rng=rng)
    _, st, _ = _assert_twin(libs, cost, tol=0.0 if family == "int_ties" else 1e-9, build="window")
    assert (st == 0).all()


@pytest.mark.parametrize(
    "family", ["int_ties", *(pytest.param(f, marks=pytest.mark.slow) for f in ("uniform", "sq_low"))]
)
def test_emulated_grid_kernel_matches_twin(libs, family, rng):
    cost = assignment_problem(family, 26, 30, batch=1, rng=rng)
    _assert_twin(libs, cost, tol=0.0 if family == "int_ties" else 1e-9, mode=3, threads=64, blocks=2)


@pytest.mark.slow  # ~50 s on 2 loaded cores
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


# ---- the launch plan a GPU gets: dynamic shared memory over 48 KB, the global fallback, 512 threads ------

H200 = dict(sms=132, smem_optin=232448)  # cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100/H200: 227 KiB


def _plan(lib, B, M, mode=0, sms=132, smem_optin=232448, per_sm=0):
    out = np.zeros(5, np.int64)
    lib.emu_plan(
        ctypes.c_int64(B),
        ctypes.c_int64(M),
        ctypes.c_int(mode),
        ctypes.c_int(sms),
        ctypes.c_int(smem_optin),
        ctypes.c_int(per_sm),
        _ptr(out),
    )
    return dict(zip(("grid", "in_shared", "blocks", "workspace", "dynamic_smem"), out.tolist()))


def test_launch_plan_boundaries(libs):
    # plan_launch is the host code's own choice (compiled here from auction_cuda.cu): 128 + 52 M bytes of state
    lib = libs["default"]
    limit = lib.emu_default_dynamic_smem
    limit.restype = ctypes.c_int64
    assert limit() == 48 * 1024
    assert _plan(lib, 4, 942) == dict(grid=0, in_shared=1, blocks=0, workspace=0, dynamic_smem=128 + 52 * 942)
    assert _plan(lib, 4, 943)["dynamic_smem"] == 128 + 52 * 943 > 48 * 1024  # opt-in needed from here
    assert _plan(lib, 4, 4467)["in_shared"] == 1 and 128 + 52 * 4467 <= H200["smem_optin"]
    assert _plan(lib, 4, 4468) == dict(grid=0, in_shared=0, blocks=0, workspace=4 * (128 + 52 * 4468), dynamic_smem=0)
    assert _plan(lib, 4, 100, mode=2)["in_shared"] == 0  # kModeBlockGlobal
    grid = _plan(lib, 4, 4096, mode=3, per_sm=1)
    assert grid["grid"] == 1 and grid["blocks"] == 132 and grid["workspace"] == 128 + 52 * 4096


def _emu_planned(lib, cost, threads, tol=1e-9):
    B, N, M = cost.shape
    col, st, rounds = _outputs(B, N)
    plan = np.zeros(3, np.int64)
    rc = lib.emu_solve_planned(
        _ptr(cost),
        ctypes.c_int(cost.dtype == np.float64),
        ctypes.c_int64(B),
        ctypes.c_int64(N),
        ctypes.c_int64(M),
        ctypes.c_int(0),
        ctypes.c_double(tol),
        ctypes.c_int(threads),
        ctypes.c_int(H200["sms"]),
        ctypes.c_int(H200["smem_optin"]),
        _ptr(col),
        _ptr(st),
        _ptr(rounds),
        _ptr(plan),
    )
    assert rc == 0, "a block wrote past its dynamic shared memory or its workspace slice"
    return (col, st, rounds), dict(zip(("in_shared", "dynamic_smem", "workspace"), plan.tolist()))


def _assert_planned(libs, cost, threads, want_shared, tol=1e-9):
    """The block kernel under the H200's plan, `threads` per block, bit-identical to the twin (and _C)."""
    cost = np.ascontiguousarray(cost)
    lib = libs["default"]
    got, plan = _emu_planned(lib, cost, threads, tol)
    assert plan["in_shared"] == want_shared, plan
    ref = _twin(lib, cost, tol=tol)
    installed = _native.cpu().solve_auction(cost, False, tol, 1, True)
    for name, x, y, z in zip(("col4row", "status", "rounds"), got, ref, installed):
        np.testing.assert_array_equal(y, z, err_msg="csrc/ and the installed _C disagree: rebuild")
        np.testing.assert_array_equal(x, y, err_msg=f"planned launch ({plan}, {threads} threads) differs in {name}")
    assert (got[1] == 0).all()
    return plan


def test_emulated_dynamic_shared_memory_over_48kb(libs, rng):
    # M = 943: the state (49,164 B) in the block's dynamic shared memory, past the 48 KB default
    plan = _assert_planned(libs, assignment_problem("uniform", 1, 943, batch=1, rng=rng), 64, want_shared=1)
    assert plan["dynamic_smem"] > 48 * 1024


@pytest.mark.slow  # 512 std::threads per block: minutes on 2 loaded cores (the 4 slow tests below: ~7 min)
def test_emulated_shipped_block_size(libs, rng):
    lib = libs["default"]
    lib.emu_block_threads.restype = ctypes.c_int
    threads = lib.emu_block_threads()
    assert threads == 512
    _assert_planned(libs, assignment_problem("sq_low", 12, 16, batch=1, rng=rng), threads, want_shared=1)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_emulated_large_m_shared_at_512_threads(libs, dtype, rng):
    cost = assignment_problem("uniform", 3, 943, batch=1, rng=rng, dtype=dtype)
    _assert_planned(libs, cost, 512, want_shared=1, tol=1e-9 if dtype == np.float64 else 1e-6)


@pytest.mark.slow
def test_emulated_global_memory_fallback_at_512_threads(libs, rng):
    # M = 4468: the state no longer fits an H200 block's 227 KiB; it moves to the global workspace
    plan = _assert_planned(libs, assignment_problem("sq_low", 2, 4468, batch=1, rng=rng), 512, want_shared=0)
    assert plan["workspace"] == 128 + 52 * 4468


# ---- the host side (make_plan, launch, on_device, check) against the recording stub runtime ---------

NO_KERNEL_IMAGE = 209  # cudaErrorNoKernelImageForDevice


def _host(
    lib,
    cost,
    mode=0,
    device=0,
    ws=-1,
    sms=132,
    smem_optin=232448,
    per_sm=1,
    cc=(8, 6),
    count=1,
    current=0,
    fail=0,
    run=False,
    threads=64,
):
    """``loom::auction_cuda_solve`` on a simulated device -> (outputs, workspace bytes, error, stub log lines)."""
    lib.emu_host_config(*(ctypes.c_int(v) for v in (sms, smem_optin, per_sm, *cc, count, current, fail, run, threads)))
    B, N, M = cost.shape
    col, st, rounds = _outputs(B, N)
    need, err = np.zeros(1, np.int64), ctypes.create_string_buffer(2000)
    rc = lib.emu_host_solve(
        _ptr(cost), ctypes.c_int(cost.dtype == np.float64), *(ctypes.c_int64(v) for v in (B, N, M)),
        ctypes.c_int(0), ctypes.c_double(1e-9), ctypes.c_int(mode), ctypes.c_int(device), ctypes.c_int64(ws),
        _ptr(col), _ptr(st), _ptr(rounds), _ptr(need), err, ctypes.c_int64(len(err)),
    )  # fmt: skip
    log = ctypes.create_string_buffer(1 << 16)
    lib.emu_host_log(log, ctypes.c_int64(len(log)))
    assert (rc == 0) == (err.value == b"")
    return (col, st, rounds), int(need[0]), err.value.decode(), log.value.decode().splitlines()


def _zeros(B, N, M):
    return np.zeros((B, N, M), np.float32)


@pytest.mark.parametrize("m", [8, 900, 942, 943, 2000, 4467, 4468, 9000])
def test_host_launch_plan_and_shared_memory_opt_in(libs, m):
    """One block per problem, 512 threads; the state (128 + 52 M bytes) in dynamic shared memory while it fits
    the device's opt-in limit, opted into above the 48 KB default (the stub refuses such a launch without it,
    as a GPU does), in a global workspace of B states beyond."""
    B, state, optin = 3, 128 + 52 * m, 232448
    _, need, err, log = _host(libs["default"], _zeros(B, 2, m))
    assert err == ""
    if state > optin:
        assert need == B * state and log == [f"launch grid={B} block=512 dyn=0 args=10"]
    elif state > 48 * 1024:
        assert need == 0 and log == [
            f"set_attribute max_dynamic_smem={state}",
            f"launch grid={B} block=512 dyn={state} args=10",
        ]
    else:
        assert need == 0 and log == [f"launch grid={B} block=512 dyn={state} args=10"]


def test_host_global_mode_and_a_smaller_device(libs):
    # mode 2 (block, global state) never uses shared memory; a device with 99 KiB of opt-in moves M = 2000 out
    _, need, _, log = _host(libs["default"], _zeros(2, 2, 100), mode=2)
    assert need == 2 * (128 + 52 * 100) and log == ["launch grid=2 block=512 dyn=0 args=10"]
    _, need, _, log = _host(libs["default"], _zeros(2, 2, 2000), smem_optin=101376)
    assert need == 2 * (128 + 52 * 2000) and log == ["launch grid=2 block=512 dyn=0 args=10"]


@pytest.mark.parametrize("m, sms, per_sm, blocks", [(10, 132, 1, 1), (1000, 132, 1, 63), (9000, 132, 1, 132),
                                                    (9000, 132, 4, 264), (9000, 2, 0, None)])  # fmt: skip
def test_host_cooperative_loop(libs, m, sms, per_sm, blocks):
    """Mode 3: one cooperative launch per problem, a warp per column up to the resident blocks (at most 2 per SM)."""
    B = 3
    _, need, err, log = _host(libs["default"], _zeros(B, 2, m), mode=3, sms=sms, per_sm=per_sm)
    if blocks is None:
        assert "the grid kernel cannot be resident" in err
        return
    assert err == "" and need == 128 + 52 * m
    assert log == ["occupancy block=512 dyn=0"] * 2 + [f"cooperative grid={blocks} block=512 dyn=0 args=9"] * B


def test_host_error_paths(libs):
    lib = libs["default"]
    _, _, err, log = _host(lib, _zeros(2, 3, 5), fail=NO_KERNEL_IMAGE, cc=(12, 0))
    assert "no kernel image is available" in err and "This GPU is sm_120" in err
    assert 'LOOM_CUDA_ARCHS="120" pip install' in err and "backend='cpu'" in err
    _, _, err, _ = _host(lib, _zeros(2, 3, 5), mode=3, fail=NO_KERNEL_IMAGE, cc=(7, 5))
    assert "cudaLaunchCooperativeKernel failed" in err and "sm_75" in err
    _, need, err, _ = _host(lib, _zeros(2, 3, 5000), ws=100)  # a workspace too small for the plan
    assert need == 2 * (128 + 52 * 5000) and f"workspace of 100 bytes, needs {need}" in err
    assert "N <= M" in _host(lib, _zeros(1, 6, 5))[2] and "unknown mode" in _host(lib, _zeros(1, 2, 5), mode=7)[2]
    # N = 0: statuses and rounds zeroed, nothing launched
    (_, st, rounds), _, err, log = _host(lib, _zeros(4, 0, 5))
    assert err == "" and (st == 0).all() and (rounds == 0).all() and log == ["memset 4", "memset 32"]


def test_host_switches_to_the_device_and_back(libs):
    lib = libs["default"]
    _, _, err, log = _host(lib, _zeros(1, 2, 5), device=1, count=2, current=0)
    # the workspace query, then the solve: each on device 1, the caller's device 0 restored after
    assert err == "" and log == [
        "set_device 1",
        "set_device 0",
        "set_device 1",
        "launch grid=1 block=512 dyn=388 args=10",
        "set_device 0",
    ]
    _, _, err, log = _host(lib, _zeros(1, 2, 5), device=1, count=2, fail=NO_KERNEL_IMAGE)
    assert "no kernel image" in err and log[-1] == "set_device 0"  # restored on the error path too
    assert "cudaSetDevice failed: invalid device ordinal" in _host(lib, _zeros(1, 2, 5), device=3, count=2)[2]


@pytest.mark.parametrize("mode, m", [(0, 40), (2, 40), (3, 30)])
def test_host_launch_runs_the_kernels_with_their_arguments(libs, rng, mode, m):
    """The launches run on the emulator (64 threads per block): the arguments the host code packs reach the
    kernels in order, and the result is the CPU twin's, bit for bit."""
    cost = np.ascontiguousarray(assignment_problem("uniform", 12, m, batch=2, rng=rng))
    got, _, err, log = _host(libs["default"], cost, mode=mode, run=True, threads=64)
    assert err == "", err
    ref = _twin(libs["default"], cost)
    for name, x, y in zip(("col4row", "status", "rounds"), got, ref):
        np.testing.assert_array_equal(x, y, err_msg=f"mode {mode}: {name}")


class _StubCuda:
    """The ``_cuda`` module's entry points (csrc/bindings_cuda.cpp's names and argument order) over the stub."""

    def __init__(self, lib):
        self.lib, self.calls = lib, []
        lib.emu_host_workspace_bytes.restype = ctypes.c_int64

    def workspace_bytes(self, B, N, M, mode=0, device=0):
        self.calls.append(("workspace_bytes", B, N, M, mode, device))
        return self.lib.emu_host_workspace_bytes(*(ctypes.c_int64(v) for v in (B, N, M)), ctypes.c_int(mode),
                                                 ctypes.c_int(device))  # fmt: skip

    def solve_auction(self, cost_ptr, dtype, B, N, M, maximize, tol, col4row_ptr, status_ptr, workspace_ptr,
                      workspace_bytes, rounds_ptr=0, stream=0, device=0, mode=0):  # fmt: skip
        assert dtype in ("float32", "float64")
        self.calls.append(("solve_auction", dtype, B, N, M, maximize, workspace_bytes, device, mode))
        err = ctypes.create_string_buffer(2000)
        u = ctypes.c_uint64
        rc = self.lib.emu_host_solve_raw(
            u(cost_ptr), ctypes.c_int(dtype == "float64"), *(ctypes.c_int64(v) for v in (B, N, M)),
            ctypes.c_int(maximize), ctypes.c_double(tol), u(col4row_ptr), u(status_ptr), u(workspace_ptr),
            u(workspace_bytes), u(rounds_ptr), ctypes.c_int(device), ctypes.c_int(mode), err, ctypes.c_int64(2000),
        )  # fmt: skip
        if rc:
            raise RuntimeError(err.value.decode())


@pytest.mark.parametrize("mode, m", [(0, 20), (0, 1000), (2, 20), (3, 20)])
def test_solve_cuda_drives_the_host_code(libs, rng, monkeypatch, mode, m):
    """assign's solve_cuda without a GPU: torch's device calls stand in, the ``_cuda`` module is the stub above,
    so its buffers, workspace size, argument order and mode reach the real host code and the kernels."""
    import types

    import torch

    from loom_kernels.assign.dispatch import solve_cuda

    lib = libs["default"]
    lib.emu_host_config(*(ctypes.c_int(v) for v in (132, 232448, 1, 9, 0, 1, 0, 0, 1, 64)))
    stub = _StubCuda(lib)
    monkeypatch.setattr(_native, "cuda", lambda: stub)
    monkeypatch.setattr(torch.cuda, "device", lambda dev: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev=None: types.SimpleNamespace(cuda_stream=0))
    cost = np.ascontiguousarray(assignment_problem("uniform", 3, m, batch=2, rng=rng))
    rounds = torch.full((2,), -1, dtype=torch.int64)
    col, st = solve_cuda(torch.from_numpy(cost), False, 1e-9, mode=mode, rounds=rounds)
    ref = _twin(lib, cost)
    for name, x, y in zip(("col4row", "status", "rounds"), (col.numpy(), st.numpy(), rounds.numpy()), ref):
        np.testing.assert_array_equal(x, y, err_msg=f"mode {mode}, M={m}: {name}")
    ws = 0 if mode in (0, 1) else (2 if mode == 2 else 1) * (128 + 52 * m)
    assert stub.calls == [
        ("workspace_bytes", 2, 3, m, mode, 0),
        ("solve_auction", "float64", 2, 3, m, False, ws, 0, mode),
    ]


@pytest.mark.cuda
@pytest.mark.parametrize("n, m", [(3, 943), (2, 4468), (64, 1024)])
def test_cuda_large_m_launch_matches_twin(n, m, rng):
    # The real launches modelled above: opt-in dynamic shared memory from M = 943, the global workspace
    # beyond the device's opt-in limit (M >= 4468 on an H100/H200), 512 threads; bit-identical to the twin.
    import torch

    from loom_kernels.assign.dispatch import solve_cuda

    cost = np.ascontiguousarray(assignment_problem("sq_low", n, m, batch=2, rng=rng))
    t = torch.as_tensor(cost, device="cuda")
    rounds = torch.full((2,), -1, dtype=torch.int64, device="cuda")
    col, st = solve_cuda(t, False, 1e-9, rounds=rounds)
    torch.cuda.synchronize()
    ref = _native.cpu().solve_auction(cost, False, 1e-9, 1, True)
    for name, x, y in zip(
        ("col4row", "status", "rounds"), (col.cpu().numpy(), st.cpu().numpy(), rounds.cpu().numpy()), ref
    ):
        np.testing.assert_array_equal(x, y, err_msg=f"GPU launch at M={m} differs from the twin in {name}")
    optin = getattr(torch.cuda.get_device_properties(t.device), "shared_memory_per_block_optin", None)
    if optin is not None:
        state = 128 + 52 * m
        want = 0 if state <= optin else 2 * state
        assert _native.cuda().workspace_bytes(2, n, m, 0, t.device.index) == want
