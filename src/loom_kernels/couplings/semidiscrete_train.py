"""Training with a fitted semidiscrete potential: fresh noise per batch, or LOOM's table seeded from the cells.

- **fresh** (SD-FM's data loader): ``SemidiscreteSampler`` is a batch sampler; each batch it yields is the
  data indices that ``b`` fresh noises fell on, and ``coupling(x1, indices)`` returns that noise.
- **seeded** (LOOM with fresh noise): ``fill_table`` gives each data item ``num_caches`` seeds whose noise
  falls in its own Laguerre cell, written into a ``LoomCoupling``'s seed table; ``SemidiscreteSeededCoupling``
  refills it every ``refresh_every`` epochs and is LOOM otherwise (a normal loader, LOOM's swaps on top).
"""

from __future__ import annotations

import torch

from ..noise import gaussian_noise
from .base import Coupling
from .loom.seed_stream import seed_values

__all__ = ["SemidiscreteSampler", "SemidiscreteSeededCoupling", "fill_table"]


class SemidiscreteSampler(torch.utils.data.Sampler):
    """A batch sampler over the data set (``DataLoader(ds, batch_sampler=SemidiscreteSampler(sd, 256))``):
    each batch is ``sd.draw(batch_size, part=part)``, ``num_batches`` per epoch (default
    ``ceil(N / (world * batch_size))``: an epoch draws about N items over all ranks).

    The loader must yield the indices (``(index, x)`` items, as ``loom_kernels.data.IndexedDataset``); the
    loop then calls ``x0, x1 = sd(x1, idx)``. Draws happen in the loader's main process, in order.

    Under DDP each rank iterates its own sampler: ``part=(rank, world)`` (a ``ShardedSemidiscreteCoupling``'s
    own by default) gives it its slice of each global batch of ``world * batch_size`` fresh noises; the
    indices are global, so each rank's loader reads the whole data set (resident, or a memmap).
    """

    def __init__(self, sd, batch_size: int, num_batches: int | None = None, part: tuple | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        part = tuple(getattr(sd, "part", (0, 1)) if part is None else part)
        if len(part) != 2 or not all(isinstance(v, int) for v in part) or not 0 <= part[0] < part[1]:
            raise ValueError(f"part must be (rank, world) with 0 <= rank < world, got {part!r}")
        self.sd, self.batch_size, self.part = sd, batch_size, part
        self.num_batches = num_batches or -(-sd.num_points // (part[1] * batch_size))

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        for _ in range(self.num_batches):
            yield self.sd.draw(self.batch_size, part=self.part).tolist()


def fill_table(sd, loom, *, rounds: int = 8, batch_size: int = 4096) -> dict:
    """Write into ``loom``'s seed table, for every item, seeds whose noise falls in the item's cell of ``sd``.

    Each round draws ``N * num_caches`` new seeds from LOOM's own stream (distinct from every seed it ever
    held), sends each noise to its cell (class-conditional with ``sd``'s labels) and fills the cells' empty
    slots in draw order. Cells still short after ``rounds`` (small cells: a fitted potential leaves few)
    keep their current seeds in the remaining slots. Returns ``{"filled": fraction of slots refreshed,
    "drawn": seeds drawn}``. Call it with the same arguments on every rank (no communication).
    """
    if loom.num_points != sd.num_points or tuple(loom.shape) != tuple(sd.shape):
        raise ValueError(
            f"loom must have the semidiscrete coupling's num_points and shape ({sd.num_points}, {sd.shape}), got "
            f"({loom.num_points}, {tuple(loom.shape)})"
        )
    if loom.table != "replicated":
        raise ValueError("fill_table needs a replicated LOOM table (every rank writes every row)")
    n, k = sd.num_points, loom.num_caches
    filled = torch.zeros(n, dtype=torch.int64)
    drawn = 0
    with loom._lock:  # LOOM's own serialisation: no call or save sees a half-written table
        for _ in range(rounds):
            for lo in range(0, n * k, batch_size):
                m = min(batch_size, n * k - lo)
                seeds = torch.from_numpy(seed_values(loom.seed, loom._next_counter, m))
                loom._next_counter += m
                labels, cond = sd.noise_conditions(m)
                _, cell = sd.assign(gaussian_noise(seeds, sd.shape, device=sd.device), labels=labels, cond=cond)
                drawn += m
                cell = cell.cpu()
                order = torch.argsort(cell, stable=True)
                c_sorted = cell[order]
                first = torch.searchsorted(c_sorted, c_sorted, right=False)
                slot = filled[c_sorted] + torch.arange(m) - first  # the next free slot of each seed's cell
                keep = slot < k
                rows, slots, vals = c_sorted[keep], slot[keep], seeds[order][keep]
                if len(rows):
                    dev = loom.table_device
                    loom._table.write_same(rows.to(dev), slots.to(dev), vals.to(dev))
                    filled += torch.bincount(rows, minlength=n)
                if bool((filled >= k).all()):
                    return {"filled": 1.0, "drawn": drawn}
    return {"filled": float(filled.clamp(max=k).sum()) / (n * k), "drawn": drawn}


class SemidiscreteSeededCoupling(Coupling):
    """LOOM whose table is refilled from the semidiscrete cells every ``refresh_every`` epochs.

    ``coupling(x1, indices, ...)`` is ``loom(x1, indices, ...)`` (same protocol, labels, cond); the table
    is filled at the first call and again each time ``refresh_every * N`` items have been coupled since.

    Example::

        seeded = SemidiscreteSeededCoupling(sd, LoomCoupling(len(data), data.shape[1:], num_caches=2))
        x0, x1 = seeded(x1, idx)
    """

    def __init__(self, sd, loom, refresh_every: int = 1, rounds: int = 8):
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every must be an int >= 1 (epochs between refills), got {refresh_every!r}")
        self.sd, self.loom, self.refresh_every, self.rounds = sd, loom, refresh_every, rounds
        self.seen = None  # items coupled since the last fill (None: never filled)
        self.last_fill: dict = {}
        self.stats = {}

    def __call__(self, x1, indices=None, *, x0=None, labels=None, cond=None, return_indices: bool = False):
        if self.seen is None or self.seen >= self.refresh_every * self.sd.num_points:
            self.last_fill = fill_table(self.sd, self.loom, rounds=self.rounds)
            self.seen = 0
        out = self.loom(x1, indices, x0=x0, labels=labels, cond=cond, return_indices=return_indices)
        self.seen += x1.shape[0]
        self.stats = self.loom.stats
        return out

    def state_dict(self) -> dict:
        return {"loom": self.loom.state_dict(), "semidiscrete": self.sd.state_dict(), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or not {"loom", "semidiscrete", "seen"} <= set(state):
            raise ValueError("state must be a SemidiscreteSeededCoupling.state_dict() (keys loom, semidiscrete, seen)")
        self.sd.load_state_dict(state["semidiscrete"])  # checks the data set first: a refusal changes nothing
        self.loom.load_state_dict(state["loom"])
        self.seen = state["seen"]
