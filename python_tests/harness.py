"""The test harness: assertions, tolerance policies, references, data factories and instrumented models
the tests share. (The multi-process harness is ``gloo_ranks.py``.)

Not shipped in the wheel; the references it checks against are :mod:`loom_kernels.testing`'s.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from loom_kernels.testing import cost_matrix_np, pairwise_cost_ref, scipy_assignment


def check_assignment(cost, rows, cols, maximize=False, rtol=1e-9, atol=0.0):
    """Assert that ``(rows, cols)`` is a valid optimal assignment of ``cost`` (2-D or batched):
    K = min(N, M) pairs, rows sorted, rows and columns distinct, total equal to scipy's within
    ``rtol * |total| + atol`` (use rtol=0 for exact integer costs)."""
    c = np.asarray(cost, np.float64)
    rows, cols = np.asarray(rows), np.asarray(cols)
    if c.ndim == 3:
        assert rows.shape == cols.shape == (c.shape[0], min(c.shape[1:])), (rows.shape, c.shape)
        for b in range(c.shape[0]):
            check_assignment(c[b], rows[b], cols[b], maximize, rtol, atol)
        return
    N, M = c.shape
    K = min(N, M)
    assert rows.shape == cols.shape == (K,), (rows.shape, cols.shape, c.shape)
    assert rows.dtype == np.int64 and cols.dtype == np.int64, (rows.dtype, cols.dtype)
    assert np.all(np.diff(rows) > 0), "row_ind must be strictly increasing"
    assert len(np.unique(cols)) == K, "a column is used twice"
    assert K == 0 or (rows.min() >= 0 and rows.max() < N and cols.min() >= 0 and cols.max() < M)
    ours = float(c[rows, cols].sum())
    ref = scipy_assignment(c, maximize)[2]
    assert abs(ours - ref) <= rtol * abs(ref) + atol, (ours, ref, ours - ref)


def pairwise_cost_atol(x, y, metric="sqeuclidean", eps=2.0**-24):
    """Per-entry absolute tolerance for the Gram-identity cost with float32 accumulation.

    The product and norms round at ``eps`` relative to ``|x|^2 + |y|^2`` per accumulation step
    (a few ulps, growing like sqrt(D) in a blocked sum); the square root turns an absolute error
    e in the square d into at most min(sqrt(e), e / sqrt(d)). ``eps`` is 2**-24 for IEEE float32
    and 2**-11 for TF32 products.
    """
    import math

    x = torch.as_tensor(x).double().cpu()
    y = torch.as_tensor(y).double().cpu()
    scale = (x * x).sum(-1).unsqueeze(-1) + (y * y).sum(-1).unsqueeze(-2)
    tol = (4.0 + 2.0 * math.sqrt(x.shape[-1])) * eps * scale + 1e-30
    if metric == "sqeuclidean":
        return tol
    # |sqrt(a) - sqrt(b)| <= min(sqrt(|a - b|), |a - b| / sqrt(b)), plus the rounding of the root.
    root = pairwise_cost_ref(x, y, "euclidean")
    return torch.minimum(tol.sqrt(), tol / root) + 2.0 * eps * root


class CountingModel:
    """Wraps ``fn(x, t)``; counts calls and records each call's t (and its dtype/device/shape)."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0
        self.ts = []

    def __call__(self, x, t):
        self.calls += 1
        self.ts.append(t.detach().clone())
        return self.fn(x, t)


def linear_field(a):
    """dx/dt = a*x, x(t) = x0 * exp(a (t - t0)): (model, exact(x0, t0, t1))."""
    import math

    return (lambda x, t: a * x), (lambda x0, t0, t1: x0 * math.exp(a * (t1 - t0)))


def time_field(c):
    """dx/dt = c*t (independent of x), x(t) = x0 + c (t^2 - t0^2) / 2: (model, exact)."""
    return (lambda x, t: c * t.reshape((-1,) + (1,) * (x.ndim - 1)).expand_as(x).to(x.dtype)), (
        lambda x0, t0, t1: x0 + 0.5 * c * (t1 * t1 - t0 * t0)
    )


def convergence_order(nfes, errors):
    """Least-squares slope of log(error) against log(step size) (step size ~ 1/nfe)."""
    import numpy as np

    logh = -np.log(np.asarray(nfes, np.float64))
    loge = np.log(np.asarray(errors, np.float64))
    return float(np.polyfit(logh, loge, 1)[0])


# ---- row matching and the per-class OT reference ------------------------------------------------------


def source_rows(out, src):
    """Row matching: for each row of ``out`` (B, ...) the index of the identical row of ``src`` (N, ...),
    an int64 tensor (B,). Rows of ``src`` must be distinct; fails when a row of ``out`` is not exactly one
    row of ``src`` (so a coupling that altered, blended or invented a row cannot pass).

    >>> source_rows(x0[perm], x0).tolist() == perm.tolist()
    """
    eq = (out.flatten(1)[:, None] == src.flatten(1)[None]).all(-1)
    assert (eq.sum(1) == 1).all(), "an output row is not exactly one row of the source"
    return eq.float().argmax(1)


def per_class_ot(x1, x0, labels=None, metric="sqeuclidean"):
    """The per-class OT reference: ``col`` (int64 tensor, (B,)) such that ``x0[col]`` is x0 reordered to
    x1's rows (B, ...) by exact OT (scipy on the float64 explicit-difference cost, ``cost_matrix_np``).
    With ``labels`` (B,), each class alone: x0 has B rows too, row j in item j's class, and ``col[i]`` is in
    ``i``'s class. Without, plain OT over x0's M >= B rows.

    >>> x0[per_class_ot(x1, x0, y)]  # the per-class OT pairing of x0 with x1
    """
    if labels is None:
        return torch.from_numpy(linear_sum_assignment(cost_matrix_np(x1, x0, metric))[1])
    col = torch.empty(len(x1), dtype=torch.int64)
    for k in labels.unique().tolist():
        sel = torch.nonzero(labels == k)[:, 0]
        _, c = linear_sum_assignment(cost_matrix_np(x1[sel], x0[sel], metric))
        col[sel] = sel[torch.from_numpy(c)]
    return col


def pair_costs(x1, x0, metric="sqeuclidean"):
    """float64 numpy (B,): the cost of pairing ``x1[i]`` with ``x0[i]`` (explicit differences)."""
    d = np.square(np.asarray(x1, np.float64).reshape(len(x1), -1) - np.asarray(x0, np.float64).reshape(len(x0), -1))
    d = d.sum(1)
    return d if metric == "sqeuclidean" else np.sqrt(d)


# ---- data factories: seeded, so a test's data is the same on every run -------------------------------------


def clustered(n, shape, seed=0, *, spread=1.0, shifted=2, classes=None):
    """``n`` points of ``shape`` from ``torch.Generator().manual_seed(seed)``: Gaussian with std ``spread``,
    the first ``n // shifted`` moved by +2 on every coordinate (two clusters, so OT plans differ clearly from
    the identity). With ``classes``, also (n,) int64 labels in [0, classes) drawn next from the same
    generator: ``(x, y)``.

    >>> x = clustered(64, (3,), seed=1, spread=0.5)
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g) * spread
    x[: n // shifted] += 2.0
    return x if classes is None else (x, torch.randint(classes, (n,), generator=g))


def noise_data_pair(b, dims, seed, dtype=torch.float32, *, width=1.0):
    """A batch pair from ``torch.Generator().manual_seed(seed)``: ``x0`` (b, *dims) standard normal (the noise)
    and ``x1`` uniform on [-0.5, width - 0.5) (the data), drawn in that order, in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((b, *dims), generator=g, dtype=dtype)
    return x0, torch.rand((b, *dims), generator=g, dtype=dtype) * width - 0.5
