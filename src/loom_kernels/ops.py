"""``torch.library`` custom ops: ``assign``, ``pairwise_cost`` and ``gaussian_noise`` inside ``torch.compile``.

Dynamo cannot trace into the native solver (numpy buffers, raw pointers) or a Triton launch made
from Python, so without these ops every call breaks the graph. Each public function checks
``compiling()`` first and, while Dynamo traces, hands its arguments to the op registered here:
the graph then holds one opaque node per call, whose fake implementation gives the output's
shape, dtype and device (and raises the same error as eager on bad shapes), and whose real
implementation runs the eager function unchanged. All three ops are pure (``mutates_args=()``):
they allocate their output and read their inputs only; the noise is a function of the seeds (no
global RNG state), so replaying the graph is exact.

No autograd formula is registered: the couplings build the cost and the assignment without
gradients. A cost that must carry a gradient under compile is ``loom_kernels.cost.sq_dists``
(plain torch ops).

Example::

    @torch.compile(fullgraph=True)
    def pair(x0, x1, seeds):
        col = assign(pairwise_cost(x0, x1))            # one op each, no graph break
        return x0[col], gaussian_noise(seeds, (3, 32, 32))

The annotations below are real types (no ``from __future__ import annotations``): ``custom_op``
reads them to infer the op schema, and torch 2.4 knows only the ``typing`` spellings.
"""

import typing

import torch
from torch import Tensor

from . import assign as _assign
from . import cost as _cost
from . import noise as _noise

__all__ = ["compiling", "assign", "pairwise_cost", "gaussian_noise"]

# True while an op's implementation runs the public function eagerly: the public function must
# not hand the call back to the op (torch may report is_compiling() inside fake/AOT tracing).
_IN_OP = False


def compiling() -> bool:
    """True while Dynamo traces a call that should go through the custom op."""
    return not _IN_OP and torch.compiler.is_compiling()


def _eager(fn, *args, **kwargs):
    global _IN_OP
    prev, _IN_OP = _IN_OP, True
    try:
        return fn(*args, **kwargs)
    finally:
        _IN_OP = prev


# ---- assign --------------------------------------------------------------------------------------


@torch.library.custom_op("loom_kernels::assign", mutates_args=())
def _assign_op(  # the typing spellings: see pyproject.toml (per-file-ignores)
    cost: Tensor,
    backend: str,
    tol: typing.Optional[float],
    method: str,
    maximize: bool,
    threads: typing.Optional[int],
) -> Tensor:
    return _eager(_assign.assign, cost, backend=backend, tol=tol, method=method, maximize=maximize, threads=threads)


def _check_assign(cost, backend, tol, method, maximize, threads):
    """The checks assign makes before it reads a value, with its messages."""
    _assign.check_options(maximize, backend, tol, method, threads)
    if cost.is_complex():
        raise TypeError(f"cost must hold real numbers (float, int or bool), got dtype {cost.dtype}")
    _assign.check_shape(cost.shape)
    if cost.shape[-2] > cost.shape[-1]:
        raise ValueError(
            f"assign needs N <= M (every row gets a column), got cost of shape {tuple(cost.shape)}: "
            f"use linear_sum_assignment for more rows than columns"
        )


@_assign_op.register_fake
def _(cost, backend, tol, method, maximize, threads):
    _check_assign(cost, backend, tol, method, maximize, threads)
    on_gpu = cost.device.type == "cuda"
    if backend == "cpu" and on_gpu or backend == "cuda" and not on_gpu:
        # Same messages as eager: run its device checks on an empty problem of that device.
        _eager(_assign.assign, cost.new_empty((0, 0)), backend=backend, method=method)
    return cost.new_empty(cost.shape[:-1], dtype=torch.int64)


def assign(cost, *, backend="auto", tol=None, method="auto", maximize=False, threads=None):
    """:func:`loom_kernels.assign.assign` for a torch tensor, as one graph node."""
    # Checked here too, while Dynamo traces: a bad shape then raises eager's own exception when
    # the frame falls back to eager (under fullgraph=True, Dynamo's error names it).
    _check_assign(cost, backend, tol, method, maximize, threads)
    return _assign_op(cost, backend, None if tol is None else float(tol), method, maximize, threads)


# ---- pairwise_cost -------------------------------------------------------------------------------


@torch.library.custom_op("loom_kernels::pairwise_cost", mutates_args=())
def _pairwise_cost_op(x: Tensor, y: Tensor, metric: str, allow_tf32: bool) -> Tensor:
    return _eager(_cost.pairwise_cost, x, y, metric, allow_tf32=allow_tf32)


def _check_cost(x, y, metric):
    """pairwise_cost's checks, with its messages, before it touches a value."""
    _cost.check_points("x", x)
    _cost.check_points("y", y)
    if metric not in _cost.METRICS:
        raise ValueError(f"metric must be one of {_cost.METRICS}, got {metric!r}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got x on {x.device} and y on {y.device}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"x and y must have the same number of features D (last dimension), "
            f"got x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if x.ndim == 3 and y.ndim == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same batch size B, got x {tuple(x.shape)} and y {tuple(y.shape)}")


@_pairwise_cost_op.register_fake
def _(x, y, metric, allow_tf32):
    _check_cost(x, y, metric)
    shape = (x.shape[-2], y.shape[-2])
    if x.ndim == 3 or y.ndim == 3:
        shape = ((x if x.ndim == 3 else y).shape[0], *shape)
    return x.new_empty(shape, dtype=torch.float32)


def pairwise_cost(x, y, metric="sqeuclidean", *, allow_tf32=False):
    """:func:`loom_kernels.cost.pairwise_cost` as one graph node."""
    _check_cost(x, y, metric)
    return _pairwise_cost_op(x, y, metric, allow_tf32)


# ---- gaussian_noise ------------------------------------------------------------------------------


@torch.library.custom_op("loom_kernels::gaussian_noise", mutates_args=())
def _gaussian_noise_op(  # the typing spellings: see pyproject.toml (per-file-ignores)
    seeds: Tensor,
    shape: typing.List[int],
    device: typing.Optional[torch.device],
    dtype: torch.dtype,
) -> Tensor:
    return _eager(_noise.gaussian_noise, seeds, tuple(shape), device=device, dtype=dtype)


def _check_noise(seeds, shape, device, dtype):
    if dtype not in _noise.OUT_DTYPES:
        raise TypeError(f"dtype must be one of float32, float16, bfloat16, float64, got {dtype}")
    t, shape, _, device = _noise.prepare_seeds(seeds, shape, device)
    return (t.shape[0], *shape), device


@_gaussian_noise_op.register_fake
def _(seeds, shape, device, dtype):
    out_shape, device = _check_noise(seeds, shape, device, dtype)
    return torch.empty(out_shape, dtype=dtype, device=device)


def gaussian_noise(seeds, shape, *, device=None, dtype=torch.float32):
    """:func:`loom_kernels.noise.gaussian_noise` as one graph node (list seeds become a tensor)."""
    if not isinstance(seeds, Tensor):
        seeds = torch.as_tensor(seeds, dtype=torch.int64)
    if device is not None:
        device = torch.device(device)
    _check_noise(seeds, shape, device, dtype)
    return _gaussian_noise_op(seeds, list(_noise.as_shape(shape)), device, dtype)
