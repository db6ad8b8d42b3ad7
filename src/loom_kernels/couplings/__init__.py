"""Data-noise couplings for flow matching: independent, minibatch OT and LOOM-CFM.

All couplings follow one protocol (``base.Coupling``): ``coupling(x1, indices=None, *, x0=None, labels=None)``
returns ``(x0, x1)`` with the source first: ``x0[i]`` is the noise paired with the data item ``x1[i]``;
``labels`` keep every exchange of noise within a class. The heavy lifting lives elsewhere:
``loom_kernels.noise.gaussian_noise`` (noise as a pure function of an int64 seed),
``loom_kernels.cost.pairwise_cost`` and ``loom_kernels.assign.assign``.
This package holds only the bookkeeping:

- ``base.py``: the protocol (``Coupling``: ``__call__``, ``stats``, ``state_dict``/``load_state_dict``);
- ``independent.py``, ``minibatch.py``, ``loom.py``, ``sinkhorn.py``: the couplings, one per file;
  ``loom.py`` is the conductor of LOOM: checks, slot draw, agreement of ranks, then one step;
- ``loom_steps.py``: LOOM's global, local and grouped steps as functions over (table, group, batch);
- ``indices.py``: LOOM's index checks; ``loom_state.py``: its argument checks, state_dict, save and load;
- ``tables/``: the seed-table interface (``base.LoomTable``) and its two kinds, ``replicated.py`` (every rank
  holds the table, in memory or memory-mapped) and ``sharded.py`` (one block of rows per rank);
- ``table.py``: the table storage (memory, or a journaled, locked memory-mapped file);
  ``seed_stream.py``: the seed stream it is filled from; ``sharded.py``: the shards' storage, routing and
  checkpoint files;
- ``prefetch.py``: ``PrefetchCoupling``: couple batch t+1 on a host thread (a CUDA side stream) during step t;
- ``distributed.py``: the exchange both OT couplings use under ``torch.distributed`` (rank agreement,
  gathers, the global batch's cost);
- ``grouped.py``: ``scope="grouped"`` (a random partition of the global batch into groups solved by owner
  ranks in parallel) and the cost model behind docs/scaling.md and LoomCoupling's budget warning;
- ``common.py``: argument checks, metric names, devices, pair statistics, the label-aware solve.

Example::

    coupling = LoomCoupling(len(dataset), (3, 32, 32), num_caches=4, device="cuda")
    for idx, x1 in loader:                          # the dataset yields (index, image)
        x0, x1 = coupling(x1.cuda(), idx)           # x0[i] is x1[i]'s noise
        t = torch.rand(len(x1), device=x1.device)
        ...                                          # flow-matching loss on (1-t) x0 + t x1
"""

from .base import Coupling
from .common import METRICS
from .factory import COUPLINGS, FixedNoiseCoupling, make_coupling  # noqa: F401  (public names)
from .independent import IndependentCoupling
from .loom import LoomCoupling
from .minibatch import MinibatchOTCoupling
from .mixed import MixedCoupling, TimestepMixedCoupling
from .reflow import ReflowCoupling
from .sinkhorn import SinkhornCoupling

__all__ = [
    "Coupling",
    "IndependentCoupling",
    "MinibatchOTCoupling",
    "LoomCoupling",
    "METRICS",
    "SinkhornCoupling",
    "ReflowCoupling",
    "MixedCoupling",
    "TimestepMixedCoupling",
]
