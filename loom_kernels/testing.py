"""References and problem factories shared by tests and benchmarks.

Every kernel has a plain numpy/scipy/float64-torch reference here; tests compare against it.
Each section is owned by the module it serves.
"""
from __future__ import annotations

# ---- assignment problems and references (loom_kernels.assign) --------------------------------

# ---- pairwise cost and noise references (loom_kernels.cost, loom_kernels.noise) -------------

# ---- couplings (loom_kernels.coupling) --------------------------------------------------------


def coupling_cost_np(x1, x0, metric="sqeuclidean"):
    """float64 numpy cost between paired rows ``x1[i]`` and ``x0[i]`` (any shapes ``(b, *d)``)."""
    import numpy as np

    d = np.square(np.asarray(x1, np.float64).reshape(len(x1), -1) - np.asarray(x0, np.float64).reshape(len(x0), -1))
    d = d.sum(1)
    return d if metric == "sqeuclidean" else np.sqrt(d)


def cost_matrix_np(x, y, metric="sqeuclidean"):
    """float64 ``(N, M)`` cost by explicit differences (no matmul trick): the independent reference."""
    import numpy as np

    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    d = np.stack([np.square(x - y[j]).sum(1) for j in range(len(y))], 1) if len(y) else np.zeros((len(x), 0))
    return d if metric == "sqeuclidean" else np.sqrt(d)


def loom_table_cost(seeds, data, metric="sqeuclidean"):
    """``(P, K)`` float64 cost ``c(data[i], gaussian_noise(seeds[i, k]))`` of a whole seed table."""
    import numpy as np
    import torch

    from loom_kernels.noise import gaussian_noise

    seeds = torch.as_tensor(seeds).cpu()
    data = torch.as_tensor(data).cpu().double().numpy()
    p, k = seeds.shape
    noise = gaussian_noise(seeds.reshape(-1), data.shape[1:], device="cpu", dtype=torch.float32)
    noise = noise.double().numpy().reshape(p, k, -1)
    return np.stack([coupling_cost_np(data, noise[:, j], metric) for j in range(k)], 1)


def reference_loom_step(seeds, x1, indices, slots, metric="sqeuclidean"):
    """One LOOM step in float64 numpy + scipy: returns ``(new_seeds (P, K), x0 (b, *d), col (b,))``.

    ``slots`` are the cache slots used for each item; the table is not modified in place.
    """
    import numpy as np
    import torch
    from scipy.optimize import linear_sum_assignment

    from loom_kernels.noise import gaussian_noise

    table = torch.as_tensor(seeds).cpu().numpy().astype(np.int64)  # a copy
    idx = torch.as_tensor(indices).cpu().numpy().astype(np.int64)
    sl = torch.as_tensor(slots).cpu().numpy().astype(np.int64)
    x1 = torch.as_tensor(x1).cpu().double().numpy()
    s = table[idx, sl]
    noise = gaussian_noise(torch.from_numpy(s), x1.shape[1:], device="cpu", dtype=torch.float32).double().numpy()
    _, col = linear_sum_assignment(cost_matrix_np(x1, noise, metric))
    table[idx, sl] = s[col]
    return table, noise[col], col


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
        cost = torch.cat([((xf[a:a + step, None] - zf[None]) ** 2).sum(-1).sqrt() for a in range(0, b, step)])
        _, col = linear_sum_assignment(cost.numpy())
        for j, (i, t, k) in enumerate(zip(indices.tolist(), tables, slots)):
            t[k] = seeds[col[j]]
            torch.save(t, self._file(i))
        return z[torch.as_tensor(col)], x1


# ---- sampler / metrics ------------------------------------------------------------------------

# ---- devices -------------------------------------------------------------------------------------


def gpu_available() -> bool:
    """True when CUDA tests can run: a visible GPU, torch with CUDA, and the CUDA build."""
    try:
        import torch

        from loom_kernels._native import has_cuda

        return torch.cuda.is_available() and has_cuda()
    except Exception:
        return False
