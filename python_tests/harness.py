"""The test harness: assertions, tolerance policies and instrumented models the tests share.

Not shipped in the wheel; the references it checks against are :mod:`loom_kernels.testing`'s.
"""
from __future__ import annotations

import numpy as np

from loom_kernels.testing import pairwise_cost_ref, scipy_assignment


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

    import torch

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
