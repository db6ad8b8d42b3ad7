"""References and problem factories users can call (tests and benchmarks use them too).

Every kernel has a plain numpy/scipy/float64-torch reference here; tests compare against it.
Each section is owned by the module it serves. The test harness (assertions, tolerances, counting
models, convergence orders) lives beside the tests, in ``python_tests/harness.py``.
"""

from __future__ import annotations

# ---- assignment problems and references (loom_kernels.assign) --------------------------------
import numpy as _np

ASSIGN_FAMILIES = ("uniform", "int_ties", "sq_low", "sq_high", "huge_range", "negative")
BENCH_FAMILIES = ("unif", "sq3072", "sq2")


def _sq_dists(x, y):
    """Squared Euclidean distances in float64 (the library's Gram-identity code, on numpy arrays)."""
    import torch

    from loom_kernels.cost import sq_dists

    x = torch.from_numpy(_np.asarray(x, _np.float64))
    y = torch.from_numpy(_np.asarray(y, _np.float64))
    return sq_dists(x, y).numpy()


def ring_points(n, rng, k=8, radius=4.0, std=0.5):
    """``n`` points of the 2-D ring of ``k`` Gaussians (the classic toy data set)."""
    angle = 2 * _np.pi * rng.integers(0, k, n) / k
    centers = radius * _np.stack([_np.cos(angle), _np.sin(angle)], 1)
    return centers + std * rng.standard_normal((n, 2))


def datalike_points(n, d, rng, rank=32, noise=0.1):
    """``n`` image-like points in ``d`` dims: rank-``rank`` structure + ``noise``, tanh-squashed."""
    z = rng.standard_normal((n, rank)) @ (rng.standard_normal((rank, d)) / _np.sqrt(rank))
    return _np.tanh(z + noise * rng.standard_normal((n, d)))


def assignment_problem(family, n, m=None, *, batch=None, rng=None, dtype=_np.float64, d=None):
    """A random cost matrix ``(n, m)`` (or ``(batch, n, m)``) of a named family.

    Families (tests): ``uniform`` U[0,1); ``int_ties`` integers in [0, 4) (many optima);
    ``sq_low`` / ``sq_high`` squared Euclidean, standard-normal rows vs ring / data-like
    columns in ``d`` dims (2 / 64 by default); ``huge_range`` U[0,1) times 10^U[-8, 8) per
    entry; ``negative`` standard normal (negative entries). Benchmarks: ``unif``, ``sq3072``
    (noise vs data-like points in 3072 dims, ``d`` overrides) and ``sq2`` (noise vs ring).
    """
    rng = _np.random.default_rng() if rng is None else rng
    m = n if m is None else m
    if batch is not None:
        return _np.stack([assignment_problem(family, n, m, rng=rng, dtype=dtype, d=d) for _ in range(batch)])
    if family in ("uniform", "unif"):
        c = rng.random((n, m))
    elif family == "int_ties":
        c = rng.integers(0, 4, (n, m)).astype(_np.float64)
    elif family in ("sq_low", "sq2"):
        dim = 2 if d is None else d
        c = _sq_dists(rng.standard_normal((n, dim)), ring_points(m, rng) if dim == 2 else datalike_points(m, dim, rng))
    elif family in ("sq_high", "sq3072"):
        dim = (64 if family == "sq_high" else 3072) if d is None else d
        c = _sq_dists(rng.standard_normal((n, dim)), datalike_points(m, dim, rng))
    elif family == "huge_range":
        c = rng.random((n, m)) * 10.0 ** rng.uniform(-8, 8, (n, m))
    elif family == "negative":
        c = rng.standard_normal((n, m))
    else:
        raise ValueError(f"family must be one of {ASSIGN_FAMILIES + BENCH_FAMILIES}, got {family!r}")
    return c.astype(dtype)


def assignment_total(cost, rows, cols):
    """Float64 total of the chosen pairs; ``cost (..., N, M)``, ``rows``/``cols`` ``(..., K)``."""
    cost = _np.asarray(cost, _np.float64)
    rows, cols = _np.asarray(rows), _np.asarray(cols)
    if cost.ndim == 2:
        return float(cost[rows, cols].sum())
    b = _np.arange(cost.shape[0])[:, None]
    return cost[b, rows, cols].sum(-1)


def scipy_assignment(cost, maximize=False):
    """scipy reference on the float64 value of ``cost``: ``(rows, cols, total)``; batches loop.
    Raises scipy's ValueError for invalid or infeasible problems."""
    from scipy.optimize import linear_sum_assignment as lsa

    c = _np.asarray(cost, _np.float64)
    if c.ndim == 2:
        r, k = lsa(c, maximize=maximize)
        return r, k, float(c[r, k].sum())
    out = [scipy_assignment(ci, maximize) for ci in c]
    K = min(c.shape[1:])
    rows = _np.array([o[0] for o in out], _np.int64).reshape(len(out), K)
    cols = _np.array([o[1] for o in out], _np.int64).reshape(len(out), K)
    return rows, cols, _np.array([o[2] for o in out])


# ---- pairwise cost and noise references (loom_kernels.cost, loom_kernels.noise) -------------

PHILOX4X32_10_KAT = (
    # (counter[4], key[2], expected[4]) from Random123's tests/kat_vectors ("philox4x32 10" lines).
    (
        (0x00000000, 0x00000000, 0x00000000, 0x00000000),
        (0x00000000, 0x00000000),
        (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8),
    ),
    (
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
)


def philox4x32_10_ref(counter, key):
    """Philox4x32-10 on Python ints, written from the paper (Salmon et al., SC'11): 4 words."""
    mask = 0xFFFFFFFF
    c = list(counter)
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & mask, p1 & mask, ((p0 >> 32) ^ c[3] ^ k1) & mask, p0 & mask]
    return tuple(c)


def noise_stream_ref(seed: int, n: int):
    """``(words, normals)`` of one seed, the stream of ``loom_kernels.noise`` in plain Python
    (float64 math): ``n`` uint32 words and ``n`` normals, as lists."""
    import math

    bits = int(seed) & (2**64 - 1)
    key = (bits & 0xFFFFFFFF, bits >> 32)
    words, normals = [], []
    for j in range(-(-n // 4)):
        w = philox4x32_10_ref((j, 0, 0, 0), key)
        u = [((x >> 8) + 1) / 2.0**24 for x in w]
        for a, b in ((0, 1), (2, 3)):
            r = math.sqrt(-2.0 * math.log(u[a]))
            t = 2.0 * math.pi * u[b]
            normals += [r * math.cos(t), r * math.sin(t)]
        words += list(w)
    return words[:n], normals[:n]


def pairwise_cost_ref(x, y, metric="sqeuclidean"):
    """float64 cost by explicit differences (no Gram identity): ``(N, M)`` or ``(B, N, M)``.

    The independent reference for ``loom_kernels.cost.pairwise_cost``; small inputs only.
    """
    import torch

    x = torch.as_tensor(x).double().cpu()
    y = torch.as_tensor(y).double().cpu()
    d = ((x.unsqueeze(-2) - y.unsqueeze(-3)) ** 2).sum(-1)
    return d if metric == "sqeuclidean" else d.sqrt()


# ---- couplings (loom_kernels.couplings) -------------------------------------------------------


def coupling_cost_np(x1, x0, metric="sqeuclidean"):
    """float64 numpy cost between paired rows ``x1[i]`` and ``x0[i]`` (any shapes ``(b, *d)``)."""
    import numpy as np

    d = np.square(np.asarray(x1, np.float64).reshape(len(x1), -1) - np.asarray(x0, np.float64).reshape(len(x0), -1))
    d = d.sum(1)
    return d if metric == "sqeuclidean" else np.sqrt(d)


def cost_matrix_np(x, y, metric="sqeuclidean"):
    """float64 ``(N, M)`` cost by explicit differences (no matmul trick): the independent reference."""
    import numpy as np

    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    d = np.stack([np.square(x - y[j]).sum(1) for j in range(len(y))], 1) if len(y) else np.zeros((len(x), 0))
    return d if metric == "sqeuclidean" else np.sqrt(d)


def loom_table_cost(seeds, data, metric="sqeuclidean"):
    """``(P, K)`` float64 cost ``c(data[i], gaussian_noise(seeds[i, k]))`` of a whole seed table."""
    import numpy as np
    import torch

    from loom_kernels.noise import gaussian_noise

    seeds = torch.as_tensor(seeds).cpu()
    data = torch.as_tensor(data).cpu().double().numpy()
    p, k = seeds.shape
    noise = gaussian_noise(seeds.reshape(-1), data.shape[1:], device="cpu", dtype=torch.float32)
    noise = noise.double().numpy().reshape(p, k, -1)
    return np.stack([coupling_cost_np(data, noise[:, j], metric) for j in range(k)], 1)


def reference_loom_step(seeds, x1, indices, slots, metric="sqeuclidean"):
    """One LOOM step in float64 numpy + scipy: returns ``(new_seeds (P, K), x0 (b, *d), col (b,))``.

    ``slots`` are the cache slots used for each item; the table is not modified in place.
    """
    import numpy as np
    import torch
    from scipy.optimize import linear_sum_assignment

    from loom_kernels.noise import gaussian_noise

    table = torch.as_tensor(seeds).cpu().numpy().astype(np.int64)  # a copy
    idx = torch.as_tensor(indices).cpu().numpy().astype(np.int64)
    sl = torch.as_tensor(slots).cpu().numpy().astype(np.int64)
    x1 = torch.as_tensor(x1).cpu().double().numpy()
    s = table[idx, sl]
    noise = gaussian_noise(torch.from_numpy(s), x1.shape[1:], device="cpu", dtype=torch.float32).double().numpy()
    _, col = linear_sum_assignment(cost_matrix_np(x1, noise, metric))
    table[idx, sl] = s[col]
    return table, noise[col], col


# ---- sampler / metrics ------------------------------------------------------------------------


def ode_reference(model, x0, grid, method):
    """Plain float64 fixed-step integrator (the textbook formulas): the sampler's reference.

    ``grid`` is a sequence of times; returns the float64 trajectory (len(grid), B, *d).
    """
    import torch

    x = x0.detach().to(torch.float64).clone()
    out = [x]
    for a, b in zip(grid[:-1], grid[1:]):
        h = float(b) - float(a)
        ta = torch.full((x.shape[0],), float(a), dtype=torch.float64)
        if method == "euler":
            x = x + h * model(x, ta)
        elif method == "midpoint":
            xm = x + 0.5 * h * model(x, ta)
            x = x + h * model(xm, ta + 0.5 * h)
        elif method == "heun":
            k1 = model(x, ta)
            k2 = model(x + h * k1, torch.full_like(ta, float(b)))
            x = x + 0.5 * h * (k1 + k2)
        elif method == "rk4":
            k1 = model(x, ta)
            k2 = model(x + 0.5 * h * k1, ta + 0.5 * h)
            k3 = model(x + 0.5 * h * k2, ta + 0.5 * h)
            k4 = model(x + h * k3, torch.full_like(ta, float(b)))
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        else:
            raise ValueError(f"unknown method {method!r}")
        out.append(x)
    return torch.stack(out)


def w2_reference(x, y):
    """Exact W2 via scipy's linear_sum_assignment on a float64 explicit-difference cost."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    cost = cost_matrix_np(x, y)
    r, c = linear_sum_assignment(cost)
    return float(np.sqrt(cost[r, c].mean()))
