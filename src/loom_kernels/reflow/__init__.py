"""Reflow pairs stored as seeds (issue 31): ``generate_pairs`` and the pairs folder; ``python -m loom_kernels.reflow``.

A pair is the 64-bit seed of its noise (``noise.gaussian_noise`` regenerates it bit for bit on any device)
and the target a trained model's ODE maps it to: 8 bytes + the target per pair, against 2x the target for
noise + target. Train on them with :class:`loom_kernels.couplings.reflow.ReflowCoupling` (``--coupling reflow
--pairs DIR``), which regenerates the noise from the seeds.

- ``store.py``: the folder (manifest, seeds, labels/cond, memory-mapped targets, progress, checksums);
- ``generate.py``: :func:`generate_pairs` on the sampler, resumable;
- ``cli.py``: ``python -m loom_kernels.reflow generate ...``.

Example::

    pf = generate_pairs("run/model.pt", 50_000, "euler", 8, "pairs/")
    coupling = ReflowCoupling(pf)          # data: pairs_dataset(pf); x0 from the seeds
"""

from .generate import METHODS, generate_pairs
from .store import PairsFolder, open_pairs, seeds_for

__all__ = ["generate_pairs", "open_pairs", "PairsFolder", "seeds_for", "METHODS", "pairs_dataset"]


def pairs_dataset(pairs):
    """The pairs' targets as the trainer's data set: ``IndexedDataset`` (``LabeledDataset`` with labels), float32.

    Item ``i`` is ``(i, target_i[, label_i])``, so ``ReflowCoupling`` finds seed ``i`` from the index. The
    targets are read into memory (float32); for a plain loop over a larger folder, index ``PairsFolder.targets``
    (memory-mapped) yourself."""
    import torch

    from ..data import IndexedDataset, LabeledDataset

    pf = open_pairs(pairs)
    x = torch.from_numpy(pf.targets[:].astype("float32"))
    return IndexedDataset(x) if pf.labels is None else LabeledDataset(x, torch.from_numpy(pf.labels.copy()))
