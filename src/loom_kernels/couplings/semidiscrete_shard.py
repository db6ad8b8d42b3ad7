"""The semidiscrete coupling with its data set sharded over the ranks of a process group (issue 32).

Layout: the sharded LOOM table's (``loom/tables/shard_files.shard_bounds``): rank ``r`` of ``W`` scans the
contiguous rows ``[r N // W, (r + 1) N // W)``. Every assignment is ``streamed_argmin`` over that block
(``offset`` its first row, the process group): one all-gather of ``(score, index, value)`` per noise row, and
every rank holds the global winner's index (the owner is the rank whose block holds it; the lowest global
index wins a tie, as in one process).

What each rank holds, and why:

- the rows: only its block is scanned, never copied per step. ``data`` is either the whole data set (a
  resident tensor or a memmap every rank can read: the block is a view of it, and a loader reads any row by
  index), or ``num_points=N`` with ``data`` the block alone (``rows`` and ``fetch`` then gather rows from their
  owners, collectively);
- the noise of a step: the same on every rank, generated from the shared seed counter (no communication),
  so every rank receives the same global indices and the same hit counts. The fit needs no all-reduce of
  counts (the argmin's all-gather delivered every winner) and is ``semidiscrete_fit.fit`` unchanged;
- the potential ``g`` (and the fit's iterate and window counts): whole on every rank, updated identically, bit
  for bit the single-process fit given the same noise. It is 4 bytes an item against ``4 D`` for the rows,
  and keeping it whole keeps the fit and its checkpoints those of one process;
- labels and cond: whole on every rank (a draw's random conditions are those of random items).

Checkpoints are therefore those of one process (``g`` whole, the checksum of the whole data set): one file,
written by rank 0, read by every rank, loadable at any world size or by a ``SemidiscreteCoupling`` on the
whole data set (and back). A load is collective: a state refused on one rank, or that differs between ranks,
is refused on every rank and none changes.

Fresh mode under DDP: ``draw(b)`` on every rank draws the global batch of a single-process ``draw(W b)``
(every rank generates all ``W b`` noises and scans its block for all of them) and keeps its slice
``[r b, (r + 1) b)``; the indices are global, so the rank's loader reads those rows of the whole data set.
"""

from __future__ import annotations

import hashlib
import numbers
import os

import numpy as np
import torch

from .._io import atomic_save, load_verified
from ..noise import gaussian_noise
from .loom.seed_stream import seed_values
from .loom.tables.shard_files import shard_bounds
from .scopes.agree import agree
from .scopes.group import Group
from .semidiscrete import SemidiscreteCoupling, check_data_finite, data_checksum

__all__ = ["ShardedSemidiscreteCoupling"]

_WHO = "ShardedSemidiscreteCoupling"


def _digest(*parts) -> int:
    """A 62-bit int over tensors and plain values (what ranks compare to agree on a state)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p.detach().cpu().contiguous().numpy().tobytes() if isinstance(p, torch.Tensor) else repr(p).encode())
    return int.from_bytes(h.digest(), "little") & (2**62 - 1)


class _Rows:
    """The rows ``data_checksum`` reads, gathered once: a stand-in for the whole data set."""

    def __init__(self, shape, dtype, rows: dict):
        self.shape, self.dtype, self.rows = shape, dtype, rows

    def __getitem__(self, i):
        return self.rows[i]


class ShardedSemidiscreteCoupling(SemidiscreteCoupling):
    """``SemidiscreteCoupling`` whose data set is scanned in blocks by the ranks of ``process_group``.

    Args:
        data: the whole data set ``(N, *shape)`` (tensor or memmap; this rank scans the view of its block), or
            this rank's block alone with ``num_points=N`` (its rows ``[r N // W, (r + 1) N // W)``).
        num_points: ``N`` when ``data`` is the block alone.
        process_group: the ranks sharing the scan (default: the default group; without one, a single process).
        **kw: ``SemidiscreteCoupling``'s arguments (``labels`` and ``cond`` whole, ``(N,)`` / ``(N, Dc)``).

    Every method that assigns noise is collective (every rank calls it, in the same order, with the same
    arguments, ``draw``'s per-rank ``labels``/``cond`` aside): construction, ``fit``, ``mass_deviation``,
    ``draw``, ``save``/``load``. Results equal one process's: ``fit`` gives the same ``g``, ``draw(b)`` on rank
    ``r`` the slice ``[r b, (r + 1) b)`` of a single-process ``draw(W b)`` and the same noise.

    Example::

        data = np.load("data.npy", mmap_mode="r")      # every rank maps the whole file, scans its block
        sd = ShardedSemidiscreteCoupling(data, seed=0)
        sd.fit(steps=2000, batch_size=256, progress=rank == 0)
        for idx in SemidiscreteSampler(sd, 64):        # this rank's 64 global indices of each global batch
            x0, x1 = sd(torch.from_numpy(data[idx]), idx)
    """

    def __init__(self, data, *, num_points: int | None = None, process_group=None, **kw):
        if num_points is not None and (
            isinstance(num_points, bool) or not isinstance(num_points, numbers.Integral) or num_points < 1
        ):
            raise ValueError(f"num_points must be None (data is the whole data set) or an int >= 1, got {num_points!r}")
        self.grp = Group(process_group)
        self.process_group = self.grp.group if self.grp.world > 1 else None
        self.rank, self.world = self.grp.rank, self.grp.world
        self._total = None if num_points is None else int(num_points)
        super().__init__(data, **kw)

    @property
    def part(self) -> tuple:
        """``(rank, world)``: this rank's share of every draw."""
        return self.rank, self.world

    def _bind_data(self, data):
        n = int(data.shape[0]) if self._total is None else self._total
        err = None
        lo, hi = shard_bounds(n, self.world)[self.rank : self.rank + 2]
        try:
            if n < self.world:
                raise ValueError(f"num_points ({n}) must be >= the world size ({self.world}): every rank scans a row")
            if self._total is not None and data.shape[0] != hi - lo:
                raise ValueError(
                    f"data: rank {self.rank} of {self.world} holds rows [{lo}, {hi}) of num_points={n} (shard_bounds), "
                    f"so its block must have {hi - lo} rows, got {data.shape[0]}"
                )
            check_data_finite(data[lo:hi] if self._total is None else data, offset=lo)
        except ValueError as exc:
            err = exc
        shape = tuple(int(s) for s in data.shape[1:])
        config = {"num_points": n, "layout (whole or block)": int(self._total is None), "shape, dtype": _digest(
            shape, str(data.dtype).replace("torch.", ""))}  # fmt: skip
        agree(self.grp, _WHO, {}, {}, config, failed=err is not None)
        if err is not None:
            raise err
        self.whole = data if self._total is None else None
        self.data = data[lo:hi] if self.whole is not None else data
        self.num_points, self.cols, self.shape = n, (lo, hi), shape
        if self.whole is not None:
            self.checksum = data_checksum(data)
        else:  # the same rows as data_checksum(whole data set) reads, from their owners
            pick = sorted({int(k) for k in np.linspace(0, n - 1, min(n, 1024))})
            got = self.rows(torch.tensor(pick)).cpu().numpy()
            self.checksum = data_checksum(_Rows((n, *shape), data.dtype, dict(zip(pick, got))))
        self.x_sqnorm = self.sq_norms(self.data)

    # -- rows -------------------------------------------------------------------------------------

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Global rows ``idx`` on ``device``. With ``data`` a block alone, collective: every rank passes the same
        ``idx`` and each fills the rows it owns (one all-reduce of the rows)."""
        idx = torch.as_tensor(idx, dtype=torch.int64).cpu()
        if self.whole is not None:
            if isinstance(self.whole, torch.Tensor):
                return self.whole[idx.to(self.whole.device)].to(self.device)
            return torch.from_numpy(np.asarray(self.whole[idx.numpy()])).to(self.device)
        lo, hi = self.cols
        mine = (idx >= lo) & (idx < hi)
        local = idx[mine] - lo
        if isinstance(self.data, torch.Tensor):
            own = self.data[local.to(self.data.device)].to(self.device)
        else:
            own = torch.from_numpy(np.asarray(self.data[local.numpy()])).to(self.device)
        out = torch.zeros((len(idx), *self.shape), dtype=own.dtype, device=self.device)
        out[mine.to(self.device)] = own
        # every other rank adds zeros: x + 0 is exact (the rows are finite)
        return self.grp.all_reduce(out, torch.distributed.ReduceOp.SUM) if self.world > 1 else out

    def fetch(self, idx) -> torch.Tensor:
        """The rows of this rank's ``idx`` (a ``draw``'s indices, which may lie in other ranks' blocks).
        Local with the whole data set; with a block alone, collective (every rank as many indices)."""
        idx = torch.as_tensor(idx, dtype=torch.int64).cpu().reshape(-1)
        if self.whole is not None or self.world == 1:
            return self.rows(idx)
        agree(self.grp, f"{_WHO}.fetch", {"number of indices": len(idx)}, {}, {})
        every = self.grp.gather(idx)
        return self.rows(every)[self.rank * len(idx) : (self.rank + 1) * len(idx)]

    # -- fresh noise ------------------------------------------------------------------------------

    def draw(self, b: int, *, labels=None, cond=None, part: tuple | None = None) -> torch.Tensor:
        """This rank's ``b`` global indices of the next global batch (collective; see the class). ``labels``/
        ``cond``: this rank's noises' (every rank passes them, or none); ``part``: None or ``(rank, world)``."""
        err = None
        try:  # this rank's own arguments, checked before the ranks agree (a refusal is raised on every rank)
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ValueError(f"b must be an int >= 1, got {b!r}")
            if part is not None and tuple(part) != (self.rank, self.world):
                raise ValueError(f"part must be None or this rank's (rank, world) = {self.part}, got {part!r}")
            if labels is not None:
                labels = torch.as_tensor(labels).to(self.device, torch.int64)
                if labels.shape != (b,):
                    raise ValueError(f"labels must have shape (b,) = ({b},), got {tuple(labels.shape)}")
            if cond is not None:
                cond = torch.as_tensor(cond, dtype=torch.float32).to(self.device)
                cond = cond.reshape(b, -1) if cond.numel() % b == 0 and cond.numel() else None
                if cond is None:
                    raise ValueError(f"cond must have shape (b, Dc) with b = {b}")
        except ValueError as exc:
            err = exc
        ok = err is None
        sizes = {"batch size": b if ok else -1, "cond columns": cond.shape[1] if ok and cond is not None else -1}
        given = {"labels": ok and labels is not None, "cond": ok and cond is not None}
        config = {"counter": self.counter, "fit_steps": self.fit_steps}
        agree(self.grp, f"{_WHO}.draw", sizes, given, config, failed=err is not None)
        if err is not None:
            raise err
        labels = None if labels is None else self.grp.gather(labels)
        cond = None if cond is None else self.grp.gather(cond)
        big, start = self.world * b, self.counter
        labels, cond = self.noise_conditions(big, labels, cond, start)
        seeds = torch.from_numpy(seed_values(self.seed, start, big))
        _, idx = self.assign(
            gaussian_noise(seeds, self.shape, device=self.device), labels=labels, cond=cond, seed=start
        )
        self.counter += big
        mine = slice(self.rank * b, (self.rank + 1) * b)
        idx = idx.cpu()[mine].clone()
        self._pending.append((idx, seeds[mine].clone()))
        return idx

    # -- state ------------------------------------------------------------------------------------

    def _fingerprint(self, state: dict) -> int:
        fit_state = [x for kv in sorted(state.get("fit_state", {}).items()) for x in kv]
        return _digest(state.get("g"), state.get("counter"), state.get("fit_steps"), *fit_state)

    def load_state_dict(self, state: dict) -> None:
        """Collective ``SemidiscreteCoupling.load_state_dict``: refused on every rank (none changed) when any
        rank refuses its state or the ranks' states differ."""
        keep = (self.g, self.cond_weight, self.counter, self.fit_steps, self.fit_report, self.fit_state)
        pending = list(self._pending)
        err = None
        try:
            super().load_state_dict(state)
        except ValueError as exc:
            err = exc
        config = {"the state to load (g, counter, fit state)": self._fingerprint(state) if err is None else 0}
        try:
            agree(self.grp, f"{_WHO}.load_state_dict", {}, {}, config, failed=err is not None)
        except ValueError as exc:  # another rank refused, or the ranks' states differ
            err = exc
        if err is not None:  # put back what the load changed on this rank
            self.g, self.cond_weight, self.counter, self.fit_steps, self.fit_report, self.fit_state = keep
            self._pending.clear()
            self._pending.extend(pending)
            raise err

    def save(self, path: str | os.PathLike) -> None:
        """Rank 0 writes ``state_dict()`` (checksummed, atomically); every rank returns once it is on disk, or
        raises if the write failed or the ranks' states differ."""
        state = self.state_dict()
        agree(self.grp, f"{_WHO}.save", {}, {}, {"the state (g, counter, fit state)": self._fingerprint(state)})
        err = None
        if self.rank == 0:
            try:
                atomic_save(state, os.fspath(path))
            except OSError as exc:
                err = exc
        try:
            agree(self.grp, f"{_WHO}.save", {}, {}, {}, failed=err is not None)
        except ValueError as exc:
            raise OSError(f"rank 0 failed to write {os.fspath(path)!r} (see the error raised there)") from exc
        if err is not None:
            raise err

    def load(self, path: str | os.PathLike) -> None:
        """Every rank reads ``path`` (a file all of them see) and loads it collectively."""
        state, err = None, None
        try:
            state = load_verified(os.fspath(path))
        except (OSError, ValueError) as exc:
            err = exc
        agree(self.grp, f"{_WHO}.load", {}, {}, {}, failed=err is not None)
        if err is not None:
            raise err
        self.load_state_dict(state)

    def __repr__(self):
        lo, hi = self.cols
        return (
            f"{_WHO}(num_points={self.num_points}, rows=[{lo}, {hi}), rank={self.rank}, world={self.world}, "
            f"shape={self.shape}, epsilon={self.epsilon}, metric={self.metric!r}, fit_steps={self.fit_steps})"
        )
