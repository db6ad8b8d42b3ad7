"""The ε-scaling auction: CPU twin (``_C.solve_auction``) and CUDA kernels (``_cuda.solve_auction``).

Both are checked against scipy on every problem family; the GPU is also checked to reproduce
the CPU twin exactly (same assignment, same number of bidding rounds) in float64 and float32,
which is how a failure on the GPU is told apart from a failure of the algorithm.
"""

import numpy as np
import pytest

from loom_kernels import _native
from loom_kernels.assign import assign, linear_sum_assignment
from loom_kernels.testing import ASSIGN_FAMILIES, assignment_problem, scipy_assignment

_TOL = {np.float64: 1e-9, np.float32: 1e-6}


def _twin(cost, maximize=False, tol=1e-9, threads=0):
    """CPU twin on a (B, N, M) array -> (col4row, status, rounds)."""
    return _native.cpu().solve_auction(np.ascontiguousarray(cost), maximize, tol, threads, True)


def _check_total(cost, col4row, tol, maximize=False):
    """col4row [B, N] is a valid assignment whose total is within the auction's certificate of
    scipy's optimum: |ours - opt| <= tol * sum_i |c_i,s(i)| (exact when tol == 0)."""
    c = np.asarray(cost, np.float64)
    B, N, M = c.shape
    assert col4row.shape == (B, N) and col4row.dtype == np.int64
    for b in range(B):
        cols = np.asarray(col4row[b])
        assert cols.min() >= 0 and cols.max() < M and len(np.unique(cols)) == N, cols
        chosen = c[b, np.arange(N), cols]
        ours, ref = chosen.sum(), scipy_assignment(c[b], maximize)[2]
        slack = tol * np.abs(chosen).sum()
        if maximize:
            assert ours >= ref - slack, (b, ours, ref)
        else:
            assert ours <= ref + slack, (b, ours, ref)


# ---- CPU twin ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("family", ASSIGN_FAMILIES)
def test_cpu_auction_vs_scipy(family, dtype, rng):
    cost = assignment_problem(family, 40, batch=3, rng=rng, dtype=dtype)
    col = assign(cost, method="auction")
    # int_ties are float-typed integers: the certificate then stops at P - D < 1, i.e. exact.
    _check_total(cost, col, 0.0 if family == "int_ties" else _TOL[dtype])


def test_cpu_auction_integer_input_is_exact(rng):
    cost = rng.integers(-5, 5, (4, 50, 50))  # int64: the API passes tol = 0
    col = assign(cost, method="auction")
    _check_total(cost, col, 0.0)


@pytest.mark.parametrize("shape", [(30, 45), (45, 30), (1, 7), (7, 1), (1, 1)])
def test_cpu_auction_rectangular(shape, rng):
    cost = rng.random(shape)
    rows, cols = linear_sum_assignment(cost, method="auction")
    r, k, total = scipy_assignment(cost)
    assert rows.shape == cols.shape == r.shape
    assert abs(cost[rows, cols].sum() - total) <= 1e-9 * np.abs(cost[rows, cols]).sum()


def test_cpu_auction_maximize(rng):
    cost = rng.standard_normal((3, 35, 50))
    col, st, _ = _twin(cost, maximize=True)
    assert st.tolist() == [0, 0, 0]
    _check_total(cost, col, 1e-9, maximize=True)
    col2 = assign(cost, method="auction", maximize=True)
    np.testing.assert_array_equal(col, col2)


def test_cpu_auction_inf_feasible(rng):
    n = 30
    cost = rng.random((3, n, n))
    mask = rng.random((3, n, n)) < 0.6
    for b in range(3):  # keep one random permutation finite so the problem stays feasible
        mask[b, np.arange(n), rng.permutation(n)] = False
    cost[mask] = np.inf
    col = assign(cost, method="auction")
    _check_total(cost, col, 1e-9)


def test_cpu_auction_inf_only_expensive_assignment_is_feasible():
    # The only complete finite assignment uses the huge anti-diagonal: +inf must not be
    # replaced by a stand-in that looks cheaper than it.
    n = 6
    cost = np.full((n, n), np.inf)
    cost[np.arange(n), n - 1 - np.arange(n)] = 1e6
    cost[0, :3] = 0.0  # cheap entries that cannot complete an assignment
    col = assign(cost, method="auction")
    assert col.tolist() == list(range(n - 1, -1, -1))


@pytest.mark.parametrize("case", ["row_all_inf", "hall_violation"])
def test_cpu_auction_infeasible(case, rng):
    cost = rng.random((2, 8, 8))
    if case == "row_all_inf":
        cost[1, 3, :] = np.inf
    else:  # rows 2..7 may only use columns 0..2
        cost[1, 2:, 3:] = np.inf
    with pytest.raises(ValueError, match="infeasible"):
        assign(cost, method="auction")
    _, st, _ = _twin(cost)
    assert st.tolist() == [0, 1]


# N <= 0.7 M is placed by augmenting paths alone (no bidding), wider N by the auction with its
# dummy bidders and the path finish: both regimes, every family, maximize and +inf.
@pytest.mark.parametrize("shape", [(20, 64), (44, 64), (46, 64), (63, 64)])
@pytest.mark.parametrize("family", ASSIGN_FAMILIES)
def test_cpu_auction_rectangular_both_regimes(shape, family, rng):
    cost = assignment_problem(family, *shape, batch=2, rng=rng)
    col, st, _ = _twin(cost, tol=1e-9)
    assert st.tolist() == [0, 0]
    _check_total(cost, col, 0.0 if family == "int_ties" else 1e-9)
    col, st, _ = _twin(cost, maximize=True, tol=1e-9)
    assert st.tolist() == [0, 0]
    _check_total(cost, col, 0.0 if family == "int_ties" else 1e-9, maximize=True)


@pytest.mark.parametrize("n", [12, 30])
def test_cpu_auction_rectangular_inf(n, rng):
    m = 40
    cost = rng.random((2, n, m))
    cost[rng.random(cost.shape) < 0.7] = np.inf
    cost[0, np.arange(n), rng.permutation(m)[:n]] = 2.0  # problem 0 stays feasible
    cost[1, :, 3:] = np.inf  # problem 1: every row competes for columns 0..2
    col, st, _ = _twin(cost)
    assert st.tolist() == [0, 1]
    _check_total(cost[:1], col[:1], 1e-9)


def test_cpu_auction_path_finish_bounds_rounds(rng):
    # The coupling's problem (noise vs data-like points, D = 3072). Jacobi rounds alone needed
    # ~1000-1600 rounds per 256 x 256 problem and ~20000 for 64 x 1024 (dummy price wars); the
    # path finish and the paths-only regime cut that to ~400 and ~260 (bench/RESULTS.md).
    sq = assignment_problem("sq3072", 256, batch=3, rng=rng, dtype=np.float32)
    col, st, rounds = _twin(sq, tol=1e-6)
    assert st.tolist() == [0, 0, 0] and rounds.max() < 700, rounds
    _check_total(sq, col, 1e-6)
    wide = assignment_problem("sq3072", 64, 1024, batch=1, rng=rng, dtype=np.float32)
    col, st, rounds = _twin(wide, tol=1e-6)
    assert st.tolist() == [0] and rounds.max() < 1000, rounds
    _check_total(wide, col, 1e-6)


@pytest.mark.parametrize("bad,maximize", [(np.nan, False), (-np.inf, False), (np.inf, True), (np.nan, True)])
def test_cpu_auction_invalid_entries(bad, maximize, rng):
    cost = rng.random((3, 6, 9))
    cost[2, 4, 1] = bad
    with pytest.raises(ValueError, match="invalid numeric entries"):
        assign(cost, method="auction", maximize=maximize)
    _, st, _ = _twin(cost, maximize=maximize)
    assert st.tolist() == [0, 0, 2]


def test_cpu_auction_empty():
    col, st, rounds = _twin(np.zeros((2, 0, 5)))
    assert col.shape == (2, 0) and st.tolist() == [0, 0] and rounds.tolist() == [0, 0]
    assert assign(np.zeros((0, 4)), method="auction").shape == (0,)
    assert assign(np.zeros((3, 0, 0)), method="auction").shape == (3, 0)


def test_cpu_auction_deterministic_across_threads(rng):
    cost = assignment_problem("sq_low", 48, batch=5, rng=rng)
    a = _twin(cost, threads=1)
    b = _twin(cost, threads=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_cpu_auction_identical_rows_terminate():
    # Identical bidders are the auction's worst case (price wars); ε-scaling must still end.
    cost = np.tile(np.arange(20, dtype=np.float64), (20, 1))[None]
    col, st, rounds = _twin(cost)
    assert st.tolist() == [0] and sorted(col[0].tolist()) == list(range(20))
    assert 0 < rounds[0] < 100000


@pytest.mark.parametrize("shape", [(9, 11), (40, 40), (60, 80)])
def test_cpu_auction_identical_rows_huge_range_stay_bounded(shape, rng):
    # ε0 follows the smallest row gap (1e-8 here) while prices must climb to 1e8: bidding alone
    # ran into the 2e6-round guard; the phase's round budget hands the rest to augmenting paths.
    n, m = shape
    cost = np.tile(assignment_problem("huge_range", 1, m, rng=rng), (1, n, 1))
    col, st, rounds = _twin(cost)
    assert st.tolist() == [0] and rounds[0] < 20 * m + 2000, rounds
    _check_total(cost, col, 1e-9)


def test_cpu_auction_tol_trades_accuracy(rng):
    cost = assignment_problem("sq_high", 60, batch=2, rng=rng)
    _, _, r_tight = _twin(cost, tol=1e-12)
    col, st, r_loose = _twin(cost, tol=1e-3)
    assert st.tolist() == [0, 0]
    _check_total(cost, col, 1e-3)
    assert np.all(r_loose <= r_tight)


# ---- CUDA ---------------------------------------------------------------------------------------


def _gpu(cost, maximize=False, tol=1e-9, mode=0, stream=None):
    """Raw CUDA solve of a (B, N, M) array -> numpy (col4row, status, rounds)."""
    import torch

    from loom_kernels.assign.dispatch import solve_cuda

    t = torch.as_tensor(np.ascontiguousarray(cost), device="cuda")
    rounds = torch.full((t.shape[0],), -1, dtype=torch.int64, device="cuda")
    col, st = solve_cuda(t, maximize, tol, mode=mode, rounds=rounds)
    torch.cuda.synchronize()
    return col.cpu().numpy(), st.cpu().numpy(), rounds.cpu().numpy()


def _assert_same_as_twin(cost, maximize=False, tol=1e-9, mode=0):
    ref = _twin(cost, maximize, tol)
    got = _gpu(cost, maximize, tol, mode)
    for name, x, y in zip(("col4row", "status", "rounds"), got, ref):
        np.testing.assert_array_equal(x, y, err_msg=f"GPU (mode {mode}) differs from the CPU twin in {name}")
    return got


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("family", ASSIGN_FAMILIES)
def test_cuda_auction_vs_scipy(family, dtype, rng):
    import torch

    cost = assignment_problem(family, 64, batch=4, rng=rng, dtype=dtype)
    col = assign(torch.as_tensor(cost, device="cuda"))
    assert col.device.type == "cuda" and col.dtype == torch.int64
    _check_total(cost, col.cpu().numpy(), 0.0 if family == "int_ties" else _TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("family", ["uniform", "int_ties", "sq_low", "negative"])
def test_cuda_auction_matches_cpu_twin(family, dtype, mode, rng):
    # mode 1: state in shared memory, 2: state in global memory, 3: cooperative multi-block.
    batch = 1 if mode == 3 else 3
    cost = assignment_problem(family, 96, batch=batch, rng=rng, dtype=dtype)
    tol = 0.0 if family == "int_ties" else _TOL[dtype]
    col, st, _ = _assert_same_as_twin(cost, tol=tol, mode=mode)
    assert (st == 0).all()
    _check_total(cost, col, tol)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [1, 3])
def test_cuda_auction_matches_twin_edge_cases(mode, rng):
    # rectangular, maximize, +inf feasible / infeasible, NaN, 1x1, huge range: statuses too.
    cases = []
    cases.append((rng.random((1, 30, 47)), False))  # paths only (N <= 0.7 M)
    cases.append((rng.random((1, 40, 47)), True))  # auction with dummies + path finish
    c = rng.random((1, 20, 90))
    c[rng.random(c.shape) < 0.8] = np.inf
    c[0, np.arange(20), rng.permutation(90)[:20]] = 3.0
    cases.append((c, False))
    cases.append((rng.standard_normal((1, 40, 40)), True))
    c = rng.random((1, 30, 30))
    c[rng.random(c.shape) < 0.5] = np.inf
    c[0, np.arange(30), rng.permutation(30)] = 0.5
    cases.append((c, False))
    c = rng.random((1, 12, 12))
    c[0, 3:, 4:] = np.inf
    cases.append((c, False))
    c = rng.random((1, 9, 9))
    c[0, 2, 2] = np.nan
    cases.append((c, False))
    cases.append((rng.random((1, 1, 1)), False))
    cases.append((assignment_problem("huge_range", 50, batch=1, rng=rng), False))
    for cost, maximize in cases:
        _assert_same_as_twin(cost, maximize=maximize, mode=mode)


@pytest.mark.cuda
def test_cuda_auction_mixed_batch(rng):
    # Problems of very different difficulty and scale in one launch.
    n = 80
    parts = [assignment_problem(f, n, rng=rng) for f in ("uniform", "sq_low", "huge_range", "int_ties", "negative")]
    parts.append(np.zeros((n, n)))
    parts.append(np.tile(np.arange(n, dtype=np.float64), (n, 1)))  # identical rows
    cost = np.stack(parts)
    col, st, _ = _assert_same_as_twin(cost)
    assert (st == 0).all()
    _check_total(cost, col, 1e-9)


@pytest.mark.cuda
def test_cuda_auction_large_single_problem(rng):
    cost = assignment_problem("sq_high", 1024, batch=1, rng=rng, dtype=np.float32)
    col, st, _ = _assert_same_as_twin(cost, tol=1e-6, mode=3)  # the cooperative kernel
    assert st.tolist() == [0]
    _check_total(cost, col, 1e-6)


@pytest.mark.cuda
def test_cuda_auction_non_default_stream(rng):
    import torch

    cost = assignment_problem("uniform", 128, batch=8, rng=rng)
    ref = _twin(cost * 2.0 - 1.0)[0]
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        t = torch.as_tensor(cost, device="cuda") * 2.0 - 1.0  # produced on s: the solve must wait for it
        col = assign(t)
    s.synchronize()
    np.testing.assert_array_equal(col.cpu().numpy(), ref)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_cuda_linear_sum_assignment_rectangular(shape, rng):
    import torch

    cost = rng.random(shape)
    rows, cols = linear_sum_assignment(torch.as_tensor(cost, device="cuda"))
    rows, cols = rows.cpu().numpy(), cols.cpu().numpy()
    assert np.all(np.diff(rows) > 0)
    total = cost[rows, cols].sum()
    assert abs(total - scipy_assignment(cost)[2]) <= 1e-9 * np.abs(cost[rows, cols]).sum()


@pytest.mark.cuda
def test_cuda_auction_errors(rng):
    import torch

    c = rng.random((3, 10, 10))
    c[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"invalid numeric entries.*problem 1"):
        assign(torch.as_tensor(c, device="cuda"))
    c = rng.random((3, 10, 10))
    c[2, 4:, 2:] = np.inf
    with pytest.raises(ValueError, match=r"infeasible.*problem 2"):
        assign(torch.as_tensor(c, device="cuda"))


@pytest.mark.cuda
def test_cuda_auction_empty():
    import torch

    assert assign(torch.zeros((0, 5), device="cuda")).shape == (0,)
    assert assign(torch.zeros((4, 0, 3), device="cuda")).shape == (4, 0)
