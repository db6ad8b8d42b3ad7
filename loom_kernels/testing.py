"""References and problem factories shared by tests and benchmarks.

Every kernel has a plain numpy/scipy/float64-torch reference here; tests compare against it.
Each section is owned by the module it serves.
"""
from __future__ import annotations

# ---- assignment problems and references (loom_kernels.assign) --------------------------------

# ---- pairwise cost and noise references (loom_kernels.cost, loom_kernels.noise) -------------

# ---- couplings (loom_kernels.coupling) --------------------------------------------------------

# ---- sampler / metrics ------------------------------------------------------------------------

# ---- devices -------------------------------------------------------------------------------------


def gpu_available() -> bool:
    """True when CUDA tests can run: a visible GPU, torch with CUDA, and the CUDA build."""
    try:
        import torch

        from loom_kernels._native import has_cuda

        return torch.cuda.is_available() and has_cuda()
    except Exception:
        return False
