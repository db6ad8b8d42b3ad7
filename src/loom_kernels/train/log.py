"""The training log: ``log.csv`` rows (torn-row tolerant on resume) and the coupling stats they carry."""

from __future__ import annotations

import csv
import os
import warnings

import torch

from .._io import atomic_write
from .config import LOG_COLUMNS


def stat(stats, key):
    if not stats or key not in stats:
        return float("nan")
    v = stats[key]
    return float(v.item() if isinstance(v, torch.Tensor) else v)


def _read_log(path: str, resume_step: int) -> list:
    """Rows of ``log.csv`` up to the checkpoint's step; a torn last row (a kill mid-write) is dropped with a warning."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    kept = []
    for k, r in enumerate(rows):
        try:
            step = int(r["step"])
            [float(r[c]) for c in LOG_COLUMNS[1:]]
        except (TypeError, ValueError, KeyError):
            if k == len(rows) - 1:
                warnings.warn(
                    f"{path}: dropping its torn last row {k + 2} ({r}): the run was killed while writing it",
                    RuntimeWarning,
                    stacklevel=4,
                )
                break
            raise ValueError(
                f"{path}: row {k + 2} is not a log row of columns {LOG_COLUMNS} (got {r}); "
                "fix or delete the file to resume"
            ) from None
        if step <= resume_step:
            kept.append(r)
    return kept


class CsvLog:
    """Appends rows to ``log.csv``; on resume drops rows past the checkpoint (written after it, then lost)."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            rows = _read_log(path, resume_step)

            def write(f):
                w = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
                w.writeheader()
                w.writerows(rows)

            atomic_write(path, write, mode="w")
            self.f = open(path, "a", newline="")
        else:
            self.f = open(path, "w", newline="")
            csv.DictWriter(self.f, fieldnames=LOG_COLUMNS).writeheader()
            self.f.flush()
        self.w = csv.DictWriter(self.f, fieldnames=LOG_COLUMNS)

    def write(self, row: dict) -> None:
        try:
            self.w.writerow({k: row[k] for k in LOG_COLUMNS})
            self.f.flush()
        except OSError as e:
            raise OSError(e.errno, f"cannot append a row to {self.path!r}: {e.strerror}", self.path) from e

    def close(self, quiet: bool = False) -> None:
        """Closes the file; ``quiet`` while another error propagates (a second one would replace it)."""
        try:
            self.f.close()
        except OSError as e:
            if not quiet:
                raise OSError(e.errno, f"cannot close {self.path!r}: {e.strerror}", self.path) from e
