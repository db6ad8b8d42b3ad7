"""loom_kernels.assign against scipy on fresh random problems, edge cases and bad input.

Assignments are compared by their total cost (ties allow several optima): exactly for integer
costs, within 1e-9 relative for floats (the exact solver works in float64 like scipy).
"""

import subprocess
import sys

import numpy as np
import pytest

from loom_kernels import _native
from loom_kernels.assign import assign, linear_sum_assignment
from loom_kernels.testing import ASSIGN_FAMILIES, assignment_problem, assignment_total, scipy_assignment

from harness import check_assignment

scipy = pytest.importorskip("scipy")

SHAPES = [(1, 1), (1, 5), (2, 2), (3, 7), (7, 3), (16, 16), (31, 40), (40, 31), (64, 64), (100, 257), (200, 200)]


def _rtol(family):
    return 0.0 if family == "int_ties" else 1e-9


# ---- optimality on random families ------------------------------------------------------------


@pytest.mark.parametrize("family", ASSIGN_FAMILIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_scipy(family, shape, maximize, rng):
    cost = assignment_problem(family, *shape, rng=rng)
    rows, cols = linear_sum_assignment(cost, maximize)
    check_assignment(cost, rows, cols, maximize, rtol=_rtol(family))


@pytest.mark.parametrize("family", ASSIGN_FAMILIES)
@pytest.mark.parametrize("n", [257, 400])
def test_matches_scipy_larger(family, n, rng):
    cost = assignment_problem(family, n, rng=rng)
    check_assignment(cost, *linear_sum_assignment(cost), rtol=_rtol(family))


def test_many_small_random_problems(rng):
    # Hundreds of tiny problems hit the corner cases of the initialization (ties, evictions).
    for _ in range(300):
        n, m = rng.integers(1, 12, 2)
        family = ASSIGN_FAMILIES[rng.integers(len(ASSIGN_FAMILIES))]
        cost = assignment_problem(family, int(n), int(m), rng=rng)
        maximize = bool(rng.integers(2))
        check_assignment(cost, *linear_sum_assignment(cost, maximize), maximize, rtol=_rtol(family))


@pytest.mark.parametrize(
    "make",
    [
        lambda n, rng: np.zeros((n, n)),  # everything ties
        lambda n, rng: np.add.outer(np.arange(n), np.arange(n)).astype(float),  # every permutation optimal
        lambda n, rng: np.multiply.outer(np.arange(n), np.arange(n)).astype(float),  # anti-Monge
        lambda n, rng: 1.0 + 1e-15 * rng.random((n, n)),  # ties up to the last bits
        lambda n, rng: np.eye(n) * -1e300 + 1.0,  # extreme magnitudes
        lambda n, rng: rng.integers(0, 2, (n, n)) * 1e12 + rng.integers(0, 3, (n, n)),
        lambda n, rng: np.tile(rng.random(n), (n, 1)),  # identical rows
        lambda n, rng: np.tile(rng.random((n, 1)), (1, n)),  # identical columns
    ],
    ids=["zeros", "sum", "product", "near-ties", "extreme", "two-scales", "same-rows", "same-cols"],
)
@pytest.mark.parametrize("n", [1, 2, 5, 60, 150])
def test_adversarial(make, n, rng):
    cost = make(n, rng)
    for maximize in (False, True):
        check_assignment(cost, *linear_sum_assignment(cost, maximize), maximize, rtol=1e-12)


def test_integer_totals_exact(rng):
    cost = rng.integers(-(2**20), 2**20, (150, 170))
    rows, cols = linear_sum_assignment(cost)
    assert int(cost[rows, cols].sum()) == int(scipy_assignment(cost)[2])


def _exact_total(cost, rows, cols):
    return sum(int(cost[r, c]) for r, c in zip(rows.tolist(), cols.tolist()))  # python ints: no rounding


@pytest.mark.parametrize("shape", [(60, 60), (40, 70), (70, 40)])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("torch_input", [False, True])
def test_int64_beyond_2_53_exact(rng, shape, maximize, torch_input):
    # Entries near 2**60 are not float64-exact; shifting each row (column when N > M) by its minimum is
    # exact in int64 and keeps every optimum. The reference solves the small offsets, exact in float64.
    small = rng.integers(0, 1000, shape)
    base = rng.integers(2**59, 2**60, (shape[0], 1) if shape[0] <= shape[1] else (1, shape[1]))
    cost = base + small
    if torch_input:
        torch = pytest.importorskip("torch")
        rows, cols = (x.numpy() for x in linear_sum_assignment(torch.from_numpy(cost), maximize))
    else:
        rows, cols = linear_sum_assignment(cost, maximize)
    ref_rows, ref_cols, _ = scipy_assignment(small, maximize)
    assert _exact_total(cost, rows, cols) == _exact_total(cost, ref_rows, ref_cols)
    if shape[0] == shape[1]:
        assert _exact_total(cost, np.arange(shape[0]), assign(cost, maximize=maximize)) == _exact_total(
            cost, ref_rows, ref_cols
        )


@pytest.mark.parametrize("lo,hi", [(0, 2**62), (-(2**62), 2**62), (0, 2**53)])
def test_int64_span_beyond_exact_range_is_an_error(rng, lo, hi):
    cost = rng.integers(lo, hi, (60, 60), dtype=np.int64)
    cost[0, 0], cost[0, 1] = lo, hi - 1  # the span reaches the range whatever was drawn
    with pytest.raises(ValueError, match=r"span .* exact only for spans below 2\*\*53 / \(4 \* max\(N, M\)\)"):
        linear_sum_assignment(cost)
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="exact only for spans"):
        assign(torch.from_numpy(cost))


def test_uint64_above_2_63_exact(rng):
    small = rng.integers(0, 500, (30, 30)).astype(np.uint64)
    cost = small + np.uint64(2**63 + 2**62)
    rows, cols = linear_sum_assignment(cost)
    assert _exact_total(cost, rows, cols) == _exact_total(cost, *scipy_assignment(small.astype(np.int64))[:2])


def test_float32_solved_exactly_on_its_float64_value(rng):
    cost = assignment_problem("sq_high", 120, rng=rng, dtype=np.float32)
    rows, cols = linear_sum_assignment(cost)
    check_assignment(cost.astype(np.float64), rows, cols, rtol=1e-12)


# ---- +inf, NaN, -inf ----------------------------------------------------------------------------


def _forbid(cost, frac, rng, keep_perm=True):
    cost = cost.copy()
    cost[rng.random(cost.shape) < frac] = np.inf
    if keep_perm:  # one complete finite assignment survives
        n, m = cost.shape
        perm = rng.permutation(max(n, m))
        k = min(n, m)
        r = np.arange(k) if n <= m else perm[:k]
        c = perm[:k] if n <= m else np.arange(k)
        cost[r, c] = rng.random(k)
    return cost


@pytest.mark.parametrize("shape", [(5, 5), (30, 30), (20, 45), (45, 20), (150, 150)])
@pytest.mark.parametrize("frac", [0.3, 0.9])
def test_inf_feasible(shape, frac, rng):
    cost = _forbid(assignment_problem("uniform", *shape, rng=rng), frac, rng)
    rows, cols = linear_sum_assignment(cost)
    assert np.isfinite(cost[rows, cols]).all()
    check_assignment(cost, rows, cols)


@pytest.mark.parametrize(
    "case",
    ["row", "column", "hall", "all"],
)
@pytest.mark.parametrize("shape", [(6, 6), (40, 40), (5, 9), (9, 5)])
def test_inf_infeasible(case, shape, rng):
    cost = assignment_problem("uniform", *shape, rng=rng)
    n, m = shape
    if case == "row":
        cost[rng.integers(n)] = np.inf
    elif case == "column":
        cost[:, rng.integers(m)] = np.inf
    elif case == "hall":  # three rows share only two finite columns (three columns when transposed)
        if n <= m:
            cost[:3] = np.inf
            cost[:3, :2] = 1.0
        else:
            cost[:, :3] = np.inf
            cost[:2, :3] = 1.0
    else:
        cost[:] = np.inf
    if case == "column" and n < m or case == "row" and n > m:
        # A spare column (row) absorbs it: still feasible, like scipy.
        check_assignment(cost, *linear_sum_assignment(cost))
        return
    with pytest.raises(ValueError, match="infeasible"):
        scipy_assignment(cost)
    with pytest.raises(ValueError, match="cost matrix is infeasible"):
        linear_sum_assignment(cost)


def test_infeasible_batch_names_the_problem(rng):
    cost = assignment_problem("uniform", 8, 8, batch=5, rng=rng)
    cost[3, :, 2] = np.inf
    with pytest.raises(ValueError, match=r"infeasible.*problem 3 of the batch"):
        linear_sum_assignment(cost)
    with pytest.raises(ValueError, match=r"problem 3 of the batch"):
        assign(cost)
    cost[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"invalid numeric entries.*problem 1 of the batch"):
        assign(cost)


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
@pytest.mark.parametrize("shape", [(4, 4), (3, 8), (8, 3), (70, 70)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_invalid_entries(bad, shape, dtype, rng):
    cost = assignment_problem("uniform", *shape, rng=rng).astype(dtype)
    cost[rng.integers(shape[0]), rng.integers(shape[1])] = bad
    with pytest.raises(ValueError, match="cost matrix contains invalid numeric entries"):
        linear_sum_assignment(cost)
    if np.isnan(bad):
        with pytest.raises(ValueError, match="invalid numeric entries"):
            linear_sum_assignment(cost, maximize=True)
    else:  # -inf is a forbidden pair when maximizing: a single one leaves the problem feasible
        check_assignment(cost, *linear_sum_assignment(cost, maximize=True), maximize=True)
    # Invalid entries win over infeasibility (like scipy, which checks them first).
    cost[:, 0] = np.inf if shape[0] >= shape[1] else cost[:, 0]
    cost[0, :] = np.inf if shape[0] <= shape[1] else cost[0, :]
    cost[-1, -1] = bad
    with pytest.raises(ValueError, match="invalid numeric entries"):
        linear_sum_assignment(cost)


def test_maximize_inf_rules(rng):
    cost = assignment_problem("uniform", 20, 20, rng=rng)
    plus = cost.copy()
    plus[3, 4] = np.inf
    with pytest.raises(ValueError, match="invalid numeric entries"):
        scipy_assignment(plus, maximize=True)
    with pytest.raises(ValueError, match="invalid numeric entries"):
        linear_sum_assignment(plus, maximize=True)
    # -inf is a forbidden pair when maximizing.
    minus = _forbid(cost, 0.5, rng) * -1.0
    rows, cols = linear_sum_assignment(minus, maximize=True)
    assert np.isfinite(minus[rows, cols]).all()
    check_assignment(minus, rows, cols, maximize=True)


# ---- shapes, dtypes, layouts, containers --------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 0), (0, 4), (4, 0), (0, 3, 3), (2, 0, 3), (2, 3, 0), (0, 0, 0)])
def test_empty(shape):
    cost = np.zeros(shape)
    rows, cols = linear_sum_assignment(cost)
    K = min(shape[-2:])
    expect = (K,) if len(shape) == 2 else (shape[0], K)
    assert rows.shape == cols.shape == expect and rows.dtype == cols.dtype == np.int64
    if shape[-2] <= shape[-1]:
        out = assign(cost)
        assert out.shape == shape[:-1] and out.dtype == np.int64


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.uint8, np.int32, np.int64, np.float16, np.float32, np.float64])
def test_dtypes(dtype, rng):
    if dtype == np.bool_:
        cost = rng.random((30, 35)) < 0.5
    elif np.issubdtype(dtype, np.integer):
        cost = rng.integers(0, 100, (30, 35)).astype(dtype)
    else:
        cost = rng.standard_normal((30, 35)).astype(dtype)
    rows, cols = linear_sum_assignment(cost)
    check_assignment(cost, rows, cols, rtol=1e-12)
    rows, cols = linear_sum_assignment(cost, maximize=True)
    check_assignment(cost, rows, cols, maximize=True, rtol=1e-12)


def test_layouts(rng):
    base = assignment_problem("uniform", 60, 80, rng=rng)
    variants = {
        "fortran": np.asfortranarray(base),
        "strided": np.repeat(base, 2, axis=1)[:, ::2],
        "transposed view": base.T.copy().T,
        "negative strides": base[::-1, ::-1].copy()[::-1, ::-1],
    }
    ref = linear_sum_assignment(base)
    for name, c in variants.items():
        assert np.array_equal(c, base)
        out = linear_sum_assignment(c)
        assert np.array_equal(out[0], ref[0]) and np.array_equal(out[1], ref[1]), name
    batch = assignment_problem("uniform", 20, 20, batch=4, rng=rng)
    fbatch = np.asfortranarray(batch)
    assert np.array_equal(assign(fbatch), assign(batch))


def test_list_input():
    cost = [[4, 1, 3], [2, 0, 5], [3, 2, 2]]
    rows, cols = linear_sum_assignment(cost)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 2]
    assert isinstance(rows, np.ndarray) and rows.dtype == np.int64
    assert assign(cost).tolist() == [1, 0, 2]
    assert assign([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]).tolist() == [[1, 0], [0, 1]]


@pytest.mark.parametrize("shape", [(8, 12, 12), (5, 10, 17), (6, 17, 10)])
def test_batched_equals_looped(shape, rng):
    cost = assignment_problem("sq_low", *shape[1:], batch=shape[0], rng=rng)
    rows, cols = linear_sum_assignment(cost)
    check_assignment(cost, rows, cols)
    for b in range(shape[0]):
        r, c = linear_sum_assignment(cost[b])
        assert np.array_equal(r, rows[b]) and np.array_equal(c, cols[b])
    if shape[1] <= shape[2]:
        a = assign(cost)
        assert a.shape == shape[:2]
        assert np.array_equal(a, cols)


def test_deterministic_across_threads(rng):
    cost = assignment_problem("int_ties", 40, 40, batch=16, rng=rng)
    ref = assign(cost, threads=1)
    for t in (2, 3, 7, None):
        assert np.array_equal(assign(cost, threads=t), ref)
    assert np.array_equal(assign(cost.astype(np.float32)), ref)


def test_assign_is_a_permutation(rng):
    cost = assignment_problem("sq_high", 90, rng=rng)
    a = assign(cost)
    assert sorted(a.tolist()) == list(range(90))
    assert np.isclose(assignment_total(cost, np.arange(90), a), scipy_assignment(cost)[2], rtol=1e-9)


# ---- torch in, torch out ---------------------------------------------------------------------------


def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64", "int32", "int64", "bool", "uint8"])
def test_torch_cpu(dtype, rng):
    torch = _torch()
    tdt = getattr(torch, dtype)
    if dtype == "bool":
        t = torch.from_numpy(rng.random((3, 20, 25)) < 0.5)
    elif dtype.startswith(("int", "uint")):
        t = torch.from_numpy(rng.integers(0, 50, (3, 20, 25))).to(tdt)
    else:
        t = torch.from_numpy(rng.standard_normal((3, 20, 25))).to(tdt)
    rows, cols = linear_sum_assignment(t)
    assert isinstance(rows, torch.Tensor) and rows.dtype == cols.dtype == torch.int64
    assert rows.device.type == "cpu" and rows.shape == (3, 20)
    ref = t.to(torch.float64).numpy() if dtype not in ("float16", "bfloat16") else t.float().double().numpy()
    check_assignment(ref, rows.numpy(), cols.numpy(), rtol=1e-12)
    a = assign(t[0])
    assert isinstance(a, torch.Tensor) and a.dtype == torch.int64 and a.shape == (20,)
    assert torch.equal(a, cols[0])


def test_torch_requires_grad_and_noncontiguous(rng):
    torch = _torch()
    base = torch.from_numpy(assignment_problem("uniform", 30, 30, rng=rng))
    t = base.t().clone().requires_grad_(True).t()  # non-contiguous, requires grad
    rows, cols = linear_sum_assignment(t)
    r2, c2 = linear_sum_assignment(base.numpy())
    assert np.array_equal(rows.numpy(), r2) and np.array_equal(cols.numpy(), c2)


def test_torch_rectangular_tall(rng):
    torch = _torch()
    cost = assignment_problem("negative", 9, 5, batch=4, rng=rng)
    rows, cols = linear_sum_assignment(torch.from_numpy(cost))
    check_assignment(cost, rows.numpy(), cols.numpy())
    with pytest.raises(ValueError, match="assign needs N <= M"):
        assign(torch.from_numpy(cost))


@pytest.mark.cuda
def test_cuda_tensor_stays_on_device(rng):
    # the CUDA batch path of linear_sum_assignment: 4 problems of 50 x 50, solved on the device
    torch = _torch()
    cost = assignment_problem("uniform", 50, 50, batch=4, rng=rng)
    t = torch.from_numpy(cost).cuda()
    rows, cols = linear_sum_assignment(t)
    assert rows.device == t.device and cols.dtype == torch.int64
    # the auction's certificate: within tol (1e-9 for float64) of the optimum, relative to its own total
    check_assignment(cost, rows.cpu().numpy(), cols.cpu().numpy(), rtol=2e-9)
    with pytest.raises(ValueError, match=r"backend='cpu'.*cuda.*\.cpu\(\)"):
        linear_sum_assignment(t, backend="cpu")


# ---- dispatch and errors ---------------------------------------------------------------------------


def test_errors_shape():
    with pytest.raises(ValueError, match=r"cost must have shape \(N, M\) or \(B, N, M\).*got \(3, 4, 5, 6\)"):
        linear_sum_assignment(np.ones((3, 4, 5, 6)))
    with pytest.raises(ValueError, match="expected a matrix"):
        assign(np.ones(5))
    with pytest.raises(ValueError, match="expected a matrix"):
        linear_sum_assignment(3.0)
    with pytest.raises(ValueError, match="rectangular"):
        linear_sum_assignment([[1, 2], [3]])
    with pytest.raises(ValueError, match=r"assign needs N <= M.*\(5, 3\)"):
        assign(np.ones((5, 3)))


@pytest.mark.parametrize(
    "cost",
    [np.array([["a", "b"], ["c", "d"]]), np.ones((2, 2), complex), np.array([[1, None], [2, 3]], dtype=object)],
    ids=["str", "complex", "object"],
)
def test_errors_type(cost):
    with pytest.raises(TypeError, match="cost must hold real numbers.*got dtype"):
        linear_sum_assignment(cost)


def test_errors_options():
    c = np.ones((3, 3))
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'gpu'"):
        linear_sum_assignment(c, backend="gpu")
    with pytest.raises(ValueError, match=r"method must be one of .*got 'hungarian'"):
        assign(c, method="hungarian")
    for tol in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
            assign(c, tol=tol)
    with pytest.raises(TypeError, match="tol must be a real number"):
        assign(c, tol="1e-3")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        assign(c, threads=0)
    with pytest.raises(TypeError, match="maximize must be a bool"):
        linear_sum_assignment(c, "yes")


def test_backend_cuda_with_host_data():
    with pytest.raises((RuntimeError, ValueError), match="backend='cuda'"):
        linear_sum_assignment(np.ones((3, 3)), backend="cuda")


def test_backend_cuda_with_cpu_tensor():
    torch = _torch()
    with pytest.raises((RuntimeError, ValueError), match="backend='cuda'"):
        assign(torch.ones(3, 3), backend="cuda")


def test_backend_cpu_explicit(rng):
    cost = assignment_problem("uniform", 20, 30, rng=rng)
    check_assignment(cost, *linear_sum_assignment(cost, backend="cpu", method="lap"))


def test_method_auction_dispatch(rng, monkeypatch):
    # method="auction" reaches the compiled auction (every build has it), not the exact solver
    mod = _native.cpu()
    calls = []
    real = mod.solve_auction
    monkeypatch.setattr(mod, "solve_auction", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    cost = assignment_problem("uniform", 40, 40, batch=3, rng=rng)
    rows, cols = linear_sum_assignment(cost, method="auction", tol=1e-9)
    check_assignment(cost, rows, cols, rtol=1e-6)
    assert calls == [(3, 40, 40)]


def test_import_needs_no_torch(tmp_path):
    code = "import sys, loom_kernels.assign as a; a.assign([[1.0, 2.0], [2.0, 1.0]]); print('torch' in sys.modules)"
    # cwd outside the checkout: `python -c` puts it first on sys.path, and the source tree has no _C.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False"


def test_native_second_line_checks():
    mod = _native.cpu()
    with pytest.raises(ValueError, match="N <= M"):
        mod.solve_lap(np.ones((1, 3, 2)), False, 1)
    with pytest.raises(ValueError, match="3-D"):
        mod.solve_lap(np.ones((3, 2)), False, 1)
    col, st = mod.solve_lap(np.zeros((0, 4, 5)), False, 0)
    assert col.shape == (0, 4) and st.shape == (0,)
