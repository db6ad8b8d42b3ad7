"""The LOOM-CFM paper code's coupling path, the baseline ``bench_coupling.py`` times ours against."""

from __future__ import annotations

__all__ = ["ReferencePaperCoupling"]


class ReferencePaperCoupling:
    """The LOOM-CFM reference code's coupling path, re-implemented for timing (not a copy of it).

    Per-sample seed files in ``root`` (one ``torch.save``'d int64 tensor of ``num_caches`` seeds per
    data point), per-sample CPU noise ``torch.Generator().manual_seed(s)`` + ``normal_``, a broadcast
    Euclidean cost ``(b, b, D)`` and scipy's ``linear_sum_assignment``; permuted seeds are written back
    to the files. ``chunk`` (rows) bounds the broadcast's memory; ``None`` broadcasts at once as the
    paper's code does.

    Example::

        ref = ReferencePaperCoupling(tmpdir, 1024, (3, 32, 32), num_caches=6)
        x0, x1 = ref(x1, indices)
    """

    def __init__(self, root, num_points, shape, *, num_caches=1, seed=0, chunk=None):
        import os

        import numpy as np
        import torch

        self.root, self.shape, self.num_caches, self.chunk = os.fspath(root), tuple(shape), num_caches, chunk
        os.makedirs(self.root, exist_ok=True)
        rng = np.random.default_rng(seed)
        for i in range(num_points):
            torch.save(torch.as_tensor(rng.integers(0, 2**62, num_caches), dtype=torch.int64), self._file(i))

    def _file(self, i):
        import os

        return os.path.join(self.root, f"{int(i)}.pt")

    def __call__(self, x1, indices):
        import numpy as np
        import torch
        from scipy.optimize import linear_sum_assignment

        b = len(x1)
        tables = [torch.load(self._file(i)) for i in indices.tolist()]
        slots = np.random.randint(0, self.num_caches, b)
        seeds = [int(t[k]) for t, k in zip(tables, slots)]
        z = torch.empty((b, *self.shape), dtype=x1.dtype)
        for j, s in enumerate(seeds):
            z[j].normal_(generator=torch.Generator().manual_seed(s))
        xf, zf = x1.reshape(b, -1), z.reshape(b, -1)
        step = b if self.chunk is None else self.chunk
        cost = torch.cat([((xf[a : a + step, None] - zf[None]) ** 2).sum(-1).sqrt() for a in range(0, b, step)])
        _, col = linear_sum_assignment(cost.numpy())
        for j, (i, t, k) in enumerate(zip(indices.tolist(), tables, slots)):
            t[k] = seeds[col[j]]
            torch.save(t, self._file(i))
        return z[torch.as_tensor(col)], x1
