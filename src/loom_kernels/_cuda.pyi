# Type stubs for the compiled CUDA module (csrc/bindings_cuda.cpp): raw device pointers (ints)
# from torch tensors; loom_kernels/assign.py (_solve_cuda) is the only caller. Checked against the
# module by python_tests/test_packaging.py when the CUDA module is built.

def device_count() -> int:
    """Visible CUDA devices (0 without a driver)."""

def workspace_bytes(B: int, N: int, M: int, mode: int = 0, device: int = 0) -> int:
    """Device workspace (bytes) solve_auction needs for a (B, N, M) problem."""

def solve_auction(
    cost_ptr: int,
    dtype: str,
    B: int,
    N: int,
    M: int,
    maximize: bool,
    tol: float,
    col4row_ptr: int,
    status_ptr: int,
    workspace_ptr: int,
    workspace_bytes: int,
    rounds_ptr: int = 0,
    stream: int = 0,
    device: int = 0,
    mode: int = 0,
) -> None:
    """Enqueue the epsilon-scaling auction on `stream` (see the binding's docstring for the buffers)."""
