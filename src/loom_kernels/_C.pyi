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
