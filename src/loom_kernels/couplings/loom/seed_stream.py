"""LOOM's seed stream: distinct non-negative int64 seeds, a pure function of (seed, number), invertible (so a
table can be checked against the counter: ``check_seed_table``).

Example::

    seed_values(0, 0, 4)            # the first four seeds of the stream keyed by seed=0
    seed_numbers(0, seed_values(0, 10, 3))   # -> [10, 11, 12]
"""

from __future__ import annotations

import numpy as np

# Seeds live in [0, 2**63): non-negative int64 on every backend.
_MASK63 = np.uint64((1 << 63) - 1)
_CHUNK = 1 << 22  # seeds per chunk when checking a big (memory-mapped) table


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


def seed_values(seed: int, start: int, count: int) -> np.ndarray:
    """Seeds number ``start .. start+count-1`` of the stream keyed by ``seed``: all distinct, int64 >= 0."""
    # The golden-ratio offset keeps seed 0 away from the mixer's fixed point 0.
    key = _mix63(np.array([(seed + 0x9E3779B97F4A7C15) & ((1 << 63) - 1)], dtype=np.uint64))[0]
    counter = np.arange(start, start + count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix63((counter + key) & _MASK63).astype(np.int64)


_MOD63 = 1 << 63
_MULS = (0x7FB5D329728EA185, 0x41C64E6DA3BC0075)


def _unxorshift(x: np.ndarray, s: int) -> np.ndarray:
    y = x.copy()
    for _ in range(63 // s + 1):  # x = y ^ (x >> s) converges in ceil(63 / s) rounds
        y = x ^ (y >> np.uint64(s))
    return y


def _unmix63(x: np.ndarray) -> np.ndarray:
    """The inverse of ``_mix63`` on [0, 2**63)."""
    x = x.astype(np.uint64) & _MASK63
    inv0, inv1 = (np.uint64(pow(m, -1, _MOD63)) for m in _MULS)
    with np.errstate(over="ignore"):
        x = _unxorshift(x, 33)
        x = (x * inv1) & _MASK63
        x = _unxorshift(x, 27)
        x = (x * inv0) & _MASK63
        x = _unxorshift(x, 31)
    return x


def seed_numbers(seed: int, values: np.ndarray) -> np.ndarray:
    """The stream positions of ``values`` (the inverse of ``seed_values``), uint64; values must be >= 0."""
    key = _mix63(np.array([(seed + 0x9E3779B97F4A7C15) & ((1 << 63) - 1)], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        return (_unmix63(values.astype(np.uint64)) - key) & _MASK63


def check_seed_table(seeds, seed: int, next_counter: int, where: str = "state_dict") -> None:
    """Refuse a table the stream keyed by ``seed`` cannot have produced before ``next_counter``.

    Every legitimate table holds distinct seeds numbered ``[0, next_counter)`` in the stream (they are
    only permuted, and ``resample`` draws numbers from ``next_counter`` on), so a zeroed, negative,
    duplicated or foreign table, or a counter that would hand out a seed again, is a corrupt state.
    ``seeds``: ``(P, K)`` int64 tensor or array (any device; checked in chunks).
    """
    check_counter(next_counter, int(np.prod(seeds.shape)), where)
    numbers = seed_numbers_checked(seeds, seed, next_counter, where)
    numbers.sort()
    dup = count_duplicates(numbers)
    if dup:
        raise ValueError(
            f"{where}['seeds'] holds {dup} duplicated seeds: a torn or corrupted table "
            f"(noise would be lost and doubled)"
        )


def check_counter(next_counter, total: int, where: str) -> None:
    """``next_counter`` must be an int of at least the table size ``total``."""
    if isinstance(next_counter, bool) or not isinstance(next_counter, (int, np.integer)):
        raise ValueError(f"{where}['next_counter'] must be an int, got {next_counter!r}")
    if next_counter < max(total, 1):
        raise ValueError(
            f"{where}['next_counter'] must be at least the table size {total} (the seeds handed out so far), "
            f"got {next_counter}: resample() would hand out seeds again"
        )


def seed_numbers_checked(seeds, seed: int, next_counter: int, where: str) -> np.ndarray:
    """The stream numbers (uint64, unsorted) of ``seeds``; refuses negative, all-zero and foreign seeds."""
    total = int(np.prod(seeds.shape))
    numbers = np.empty(total, dtype=np.uint64)
    flat = seeds.reshape(-1)
    for a in range(0, total, _CHUNK):
        b = min(total, a + _CHUNK)
        chunk = flat[a:b]
        chunk = chunk.cpu().numpy() if hasattr(chunk, "cpu") else np.asarray(chunk)
        if (chunk < 0).any():
            raise ValueError(
                f"{where}['seeds'] holds negative seeds (e.g. {int(chunk[chunk < 0][0])}): seeds lie in [0, 2**63)"
            )
        if a == 0 and total > 1 and not chunk.any():
            raise ValueError(f"{where}['seeds'] is all zeros (a zeroed or never-written table)")
        numbers[a:b] = seed_numbers(seed, chunk)
    bad = numbers >= np.uint64(next_counter)
    if bad.any():
        raise ValueError(
            f"{where}['seeds'] holds {int(bad.sum())} seeds that the stream of seed={seed} did not hand out "
            f"before next_counter={next_counter} (a foreign, corrupted or hand-edited table)"
        )
    return numbers


def count_duplicates(sorted_numbers: np.ndarray) -> int:
    return int((sorted_numbers[1:] == sorted_numbers[:-1]).sum())
