"""Data-noise couplings for flow matching: independent, minibatch OT, Sinkhorn, LOOM-CFM, fixed noise, reflow, mixed.

All couplings follow one protocol (``base.Coupling``):
``coupling(x1, indices=None, *, x0=None, labels=None, cond=None, return_indices=False)`` returns
``(x0, x1)`` with the source first (``(x0, x1, perm)`` with ``return_indices=True``): ``x0[i]`` is the
noise paired with the data item ``x1[i]``; ``labels`` keep every exchange of noise within a class, ``cond``
penalises exchanges between different conditions. The heavy lifting lives elsewhere:
``loom_kernels.noise.gaussian_noise`` (noise as a pure function of an int64 seed),
``loom_kernels.cost.pairwise_cost``, ``loom_kernels.assign.assign`` and ``loom_kernels.sinkhorn``.
This package holds only the bookkeeping::

    couplings/
      base.py            the protocol (Coupling) and the checks of its arguments
      factory.py         COUPLINGS (the one list of names) and make_coupling
      independent.py     IndependentCoupling        minibatch.py  MinibatchOTCoupling
      sinkhorn.py        SinkhornCoupling           fixed.py      FixedNoiseCoupling
      reflow.py          ReflowCoupling             mixed.py      MixedCoupling, TimestepMixedCoupling
      knn.py             KNNNoiseCoupling           c2ot.py       C2OT's condition options (functions)
      semidiscrete.py    SemidiscreteCoupling; semidiscrete_fit.py (the potential's ascent),
                         semidiscrete_train.py (SemidiscreteSampler, SemidiscreteSeededCoupling, fill_table),
                         semidiscrete_shard.py (ShardedSemidiscreteCoupling: the data set's rows split by rank)
      prefetch.py        PrefetchCoupling: couple batch t+1 on a host thread during step t
      scopes/            what every call shares: the process group (group.py), the scopes and the grouped
                         partition (partition.py), the agreement of ranks (agree.py), the solve (solve.py),
                         the cost model (cost_model.py), minibatch OT's and Sinkhorn's steps (*_steps.py)
      loom/              LoomCoupling (coupling.py, the conductor), its steps (steps.py), persistence
                         (persistence.py), input checks (indices.py), seed stream (seed_stream.py)
        tables/          one class per seed-table kind over base.LoomTable: replicated.py (in memory or
                         memory-mapped), sharded.py (+ shard_files.py); file_lock.py and journal.py

A new coupling is one file here plus its name in ``factory.py``; a new scope a step in ``scopes/``; a new
table kind one class in ``loom/tables/``. ``common.py``, ``distributed.py``, ``grouped.py``, ``table.py``,
``sharded.py`` and ``journal.py`` are the old import paths, re-exporting from the new homes.

Example::

    coupling = LoomCoupling(len(dataset), (3, 32, 32), num_caches=4, device="cuda")
    for idx, x1 in loader:                          # the dataset yields (index, image)
        x0, x1 = coupling(x1.cuda(), idx)           # x0[i] is x1[i]'s noise
        t = torch.rand(len(x1), device=x1.device)
        ...                                          # flow-matching loss on (1-t) x0 + t x1
"""

from .base import METRICS, Coupling
from .factory import COUPLINGS, make_coupling
from .fixed import FixedNoiseCoupling
from .independent import IndependentCoupling
from .knn import KNNNoiseCoupling
from .loom import LoomCoupling
from .minibatch import MinibatchOTCoupling
from .mixed import MixedCoupling, TimestepMixedCoupling
from .prefetch import PrefetchCoupling
from .reflow import ReflowCoupling
from .semidiscrete import SemidiscreteCoupling
from .semidiscrete_shard import ShardedSemidiscreteCoupling
from .semidiscrete_train import SemidiscreteSampler, SemidiscreteSeededCoupling
from .sinkhorn import SinkhornCoupling

__all__ = [
    "COUPLINGS",
    "METRICS",
    "Coupling",
    "FixedNoiseCoupling",
    "IndependentCoupling",
    "KNNNoiseCoupling",
    "LoomCoupling",
    "MinibatchOTCoupling",
    "MixedCoupling",
    "PrefetchCoupling",
    "ReflowCoupling",
    "SemidiscreteCoupling",
    "SemidiscreteSampler",
    "SemidiscreteSeededCoupling",
    "ShardedSemidiscreteCoupling",
    "SinkhornCoupling",
    "TimestepMixedCoupling",
    "make_coupling",
]
