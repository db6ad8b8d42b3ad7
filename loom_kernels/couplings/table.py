"""The seed stream of the LOOM seed table: distinct non-negative int64 seeds, a pure function of (seed, number)."""
from __future__ import annotations

import numpy as np

# Seeds live in [0, 2**63): non-negative int64 on every backend.
_MASK63 = np.uint64((1 << 63) - 1)
_INIT_CHUNK = 1 << 22  # rows per chunk when filling or copying big (memory-mapped) tables


def _mix63(x: np.ndarray) -> np.ndarray:
    """A bijection of [0, 2**63) (xor-shift / odd-multiply rounds mod 2**63): distinct in, distinct out."""
    x = x.astype(np.uint64) & _MASK63
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(31)
        x = (x * np.uint64(0x7FB5D329728EA185)) & _MASK63
        x ^= x >> np.uint64(27)
        x = (x * np.uint64(0x41C64E6DA3BC0075)) & _MASK63
        x ^= x >> np.uint64(33)
    return x


def _seed_values(seed: int, start: int, count: int) -> np.ndarray:
    """Seeds number ``start .. start+count-1`` of the stream keyed by ``seed``: all distinct, int64 >= 0."""
    # The golden-ratio offset keeps seed 0 away from the mixer's fixed point 0.
    key = _mix63(np.array([(seed + 0x9E3779B97F4A7C15) & ((1 << 63) - 1)], dtype=np.uint64))[0]
    counter = np.arange(start, start + count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix63((counter + key) & _MASK63).astype(np.int64)

