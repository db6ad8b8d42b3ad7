"""The custom op ``loom_kernels::assign``: ``assign`` on a torch tensor as one ``torch.compile`` graph
node (see ``loom_kernels.ops``). Imported by ``assign`` on its first call under compile, so eager use
never imports ``torch.library`` for it."""

import torch

from .. import _native
from .checks import check_tensor, check_tensor_device
from .dispatch import solve

__all__ = ["assign_op", "custom_op"]


def _impl(cost, backend, tol, method, maximize, threads):
    return solve(cost, maximize, backend, tol, method, threads, "assign").col_for_row()


def _fake(cost, backend, tol, method, maximize, threads):
    check_tensor(cost, backend, tol, method, maximize, threads)
    on_gpu = cost.device.type == "cuda"
    if backend == "cpu" and on_gpu or backend == "cuda" and not on_gpu:
        # Same messages as eager: run its device checks on an empty problem of that device.
        solve(cost.new_empty((0, 0)), False, backend, None, method, None, "assign")
    return cost.new_empty(cost.shape[:-1], dtype=torch.int64)


custom_op = torch.library.custom_op(
    "loom_kernels::assign",
    _impl,
    mutates_args=(),
    schema="(Tensor cost, str backend, float? tol, str method, bool maximize, SymInt? threads) -> Tensor",
)
custom_op.register_fake(_fake)


def assign_op(cost, *, backend="auto", tol=None, method="auto", maximize=False, threads=None):
    """``assign`` for a torch tensor as one graph node: the custom op ``loom_kernels::assign``."""
    # Checked here too, while Dynamo traces: a bad shape then raises eager's own exception when
    # the frame falls back to eager (under fullgraph=True, Dynamo's error names it).
    check_tensor(cost, backend, tol, method, maximize, threads)
    # The device checks too, with eager's exceptions: from the fake implementation they would reach the
    # user wrapped in Dynamo's TorchRuntimeError.
    if backend == "cuda" and not _native.has_cuda_build():
        _native.cuda()  # raises the "built without CUDA" error
    check_tensor_device(cost.device, backend, method)
    return custom_op(cost, backend, None if tol is None else float(tol), method, maximize, threads)
