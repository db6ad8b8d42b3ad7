"""Resumable runs: each run's record is one JSON file written atomically; a rerun skips those that exist.

Also the table writers (CSV, Markdown) and the coupling names the image experiments share.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os

from ..._io import atomic_write


def run_path(out: str, part: str, *key) -> str:
    return os.path.join(out, part, "runs", "_".join(str(k) for k in key) + ".json")


def load_record(path: str) -> dict | None:
    """The record at ``path``, or None when the run has not finished (no file)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def claim_run(path: str):
    """Yields True while this process holds the run's claim (an exclusive ``flock`` on ``path.claim``),
    False when another process holds it. The kernel drops a killed holder's claim: nothing goes stale."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path + ".claim", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            yield False
            return
        yield True
    finally:
        os.close(fd)


def save_record(path: str, rec: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: json.dump(rec, f), mode="w")


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda f: f.write(text), mode="w")


def write_csv(path: str, rows: list, cols=None) -> None:
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def markdown_table(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def available_couplings() -> tuple:
    """The coupling names ``make_coupling`` knows in this checkout (semidiscrete, reflow: when present)."""
    from ...couplings import factory

    return tuple(factory.COUPLINGS)


def progress(iterable, total=None, desc=""):
    """A tqdm bar on stderr (plain iteration when tqdm is absent)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of the trainer
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
