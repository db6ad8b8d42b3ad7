"""Dense linear assignment: a scipy-compatible ``linear_sum_assignment`` and the batched ``assign``.

The package, one idea per module: ``checks`` validates the arguments (shape, dtype, device, options)
once; ``dispatch`` is the only caller of the native solvers (:func:`dispatch.solve`); ``op`` is the
custom op ``loom_kernels::assign`` that ``assign`` becomes under ``torch.compile`` (imported on the
first call under compile). The numeric content (NaN, -inf, infeasible +inf patterns) is checked by
the native solvers inside the sweep they make over the cost anyway, and reported as the errors
scipy raises.

``import loom_kernels.assign`` needs numpy only: torch is imported when a tensor is passed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .checks import is_torch
from .dispatch import solve

if TYPE_CHECKING:  # torch stays optional: the hints name it without importing it
    import torch

    ArrayLike = np.ndarray | torch.Tensor | list

__all__ = ["linear_sum_assignment", "assign"]


def linear_sum_assignment(
    cost: ArrayLike,
    maximize: bool = False,
    *,
    backend: str = "auto",
    tol: float | None = None,
    method: str = "auto",
    threads: int | None = None,
) -> tuple[Any, Any]:
    """Solve the linear sum assignment problem, like ``scipy.optimize.linear_sum_assignment``.

    Args:
        cost: ``(N, M)`` one problem, or ``(B, N, M)`` a batch of independent problems; a numpy
            array (any real or bool dtype, any memory order), a list of lists, or a torch tensor
            on the CPU or a CUDA device. ``+inf`` marks a forbidden pair.
        maximize: maximize the total instead of minimizing it.
        backend: ``"auto"`` (CUDA tensors on their GPU, everything else on the CPU), ``"cpu"``
            or ``"cuda"``. Data is never copied between host and device behind your back.
        tol: optimality tolerance relative to the optimum, for the auction solvers; ``None``
            means 1e-9 for float64 input, 1e-6 for float32/float16/bfloat16 input and exact (0)
            for integer or bool input. The CPU ``"lap"`` method is exact and ignores it.
        method: ``"auto"`` (``"lap"`` on the CPU, the auction on CUDA), ``"lap"`` (exact
            Jonker-Volgenant shortest augmenting paths, CPU) or ``"auction"`` (epsilon-scaling
            auction, exact within ``tol``).
        threads: CPU worker threads across a batch; ``None`` uses every core.

    Returns:
        ``(row_ind, col_ind)``: int64 arrays of shape ``(K,)``, or ``(B, K)`` for a batch, with
        ``K = min(N, M)``; ``row_ind`` is sorted. numpy arrays for numpy/list input, torch
        tensors on the input's device for torch input.

    Raises:
        ValueError: wrong ndim, NaN or -inf entries (+inf too when maximizing), an infeasible
            problem (for a batch the message names the problem index), bad options.
        TypeError: non-numeric input (object, str, complex).

    Example:
        >>> import numpy as np
        >>> from loom_kernels.assign import linear_sum_assignment
        >>> rows, cols = linear_sum_assignment(np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]]))
        >>> rows.tolist(), cols.tolist()
        ([0, 1, 2], [1, 0, 2])
    """
    sol = solve(cost, maximize, backend, tol, method, threads, "linear_sum_assignment")
    return sol.row_col()


def assign(
    cost: ArrayLike,
    *,
    backend: str = "auto",
    tol: float | None = None,
    method: str = "auto",
    maximize: bool = False,
    threads: int | None = None,
) -> np.ndarray | torch.Tensor:
    """The coupling's fast path: the column given to every row, for ``N <= M``.

    Args:
        cost: ``(N, M)`` or ``(B, N, M)`` with ``N <= M``; same input types and options as
            :func:`linear_sum_assignment` (``backend``, ``tol``, ``method``, ``maximize``,
            ``threads``).

    Returns:
        ``col_for_row`` int64 of shape ``(N,)`` or ``(B, N)``, a permutation when square;
        numpy for numpy/list input, a torch tensor on the input's device for torch input.

    Example:
        >>> import numpy as np
        >>> from loom_kernels.assign import assign
        >>> assign(np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])).tolist()
        [[1, 0], [0, 1]]
    """
    if is_torch(cost):
        import torch

        if torch.compiler.is_compiling():  # one graph node: the custom op (imported while Dynamo traces)
            from .op import assign_op

            return assign_op(cost, backend=backend, tol=tol, method=method, maximize=maximize, threads=threads)
    sol = solve(cost, maximize, backend, tol, method, threads, "assign")
    return sol.col_for_row()
