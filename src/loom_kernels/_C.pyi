# Type stubs for the compiled CPU module (csrc/bindings_cpu.cpp). Keep in step with the bindings:
# python_tests/test_packaging.py checks that every name here exists in the module and back.
from typing import overload

import numpy as np
import numpy.typing as npt

def isa() -> str:
    """The instruction set the solver and noise kernels run now: scalar, avx2, avx512 or native."""

def isas() -> list[str]:
    """The instruction sets this build has and this CPU runs, best last."""

def set_isa(name: str) -> None:
    """Force the kernels' instruction set (scalar, avx2, avx512, native) or 'auto'; ValueError if absent."""

@overload
def solve_lap(
    cost: npt.NDArray[np.float64], maximize: bool, threads: int = 0
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int8]]: ...
@overload
def solve_lap(
    cost: npt.NDArray[np.float32], maximize: bool, threads: int = 0
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int8]]: ...
@overload
def solve_auction(
    cost: npt.NDArray[np.float64], maximize: bool, tol: float, threads: int = 0, with_rounds: bool = False
) -> tuple[npt.NDArray[np.int64], ...]: ...
@overload
def solve_auction(
    cost: npt.NDArray[np.float32], maximize: bool, tol: float, threads: int = 0, with_rounds: bool = False
) -> tuple[npt.NDArray[np.int64], ...]: ...
def philox_normal(seeds: npt.ArrayLike, row_len: int, threads: int = 0) -> npt.NDArray[np.float32]:
    """Philox4x32-10 + Box-Muller normals: int64 seeds (S,) -> float32 (S, row_len)."""

def philox_uint32(seeds: npt.ArrayLike, row_len: int, threads: int = 0) -> npt.NDArray[np.uint32]:
    """The raw Philox4x32-10 words: int64 seeds (S,) -> uint32 (S, row_len)."""

def philox_nearest(
    seeds: npt.NDArray[np.int64], x: npt.NDArray[np.float32], k: int, threads: int = 0
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Nearest of k: (argmin_j int64 (b,), |z|^2 - 2 <x_i, z> float64 (b, k), |x_i|^2 float64 (b,)) over the
    philox_normal rows z of seeds[i*k + j] (seeds (b*k,), x (b, D) float32), no candidate stored."""

def stream_lse(
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.float32],
    u: npt.NDArray[np.float32],
    scale: npt.NDArray[np.float32],
    threads: int = 0,
) -> npt.NDArray[np.float32]:
    """LSE_j(u_j + scale_b <x_i, y_j>) float32 (B, n) of x (B, n, D), y (B, m, D), u (B, m), scale (B,)."""

def stream_argmax(
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.float32],
    u: npt.NDArray[np.float32],
    scale: npt.NDArray[np.float32],
    ki: npt.NDArray[np.int64] | None = None,
    kj: npt.NDArray[np.int64] | None = None,
    threads: int = 0,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """(argmax_j int64 (B, n), max float32 (B, n)) of the logits [+ Gumbel(ki (B, n), kj (m,))]."""

def roofline_exp(n: int, reps: int) -> float:
    """This thread's CPU seconds for reps sweeps of n exps (the kernel's polynomial, L1-resident)."""

def roofline_fma(reps: int) -> float:
    """This thread's CPU seconds for reps * roofline_fma_per_rep() float32 FMAs in registers."""

def roofline_fma_per_rep() -> int:
    """FMAs (lanes counted) per rep of roofline_fma."""

def roofline_read(buf: npt.NDArray[np.float32], reps: int) -> float:
    """This thread's CPU seconds for reps sequential reads of the float32 buffer."""
