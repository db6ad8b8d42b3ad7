"""Semidiscrete OT with fresh noise: one potential over the data set, then every noise sample finds its cell.

Mousavi-Hosseini, Zhang, Klein, Cuturi, "Flow matching with semidiscrete couplings" (SD-FM), ICLR 2026:
fit ``g (N,)`` by stochastic ascent on the semi-dual ``E_z[min_j c(z, x_j) - g_j] + mean_j g_j``
(``semidiscrete_fit.py``), then pair each fresh noise ``z`` with ``argmin_j c(z, x_j) - g_j`` (the
Laguerre cell it falls in), one streamed pass over the data set (``loom_kernels.streamed``): O(b N D) per
batch, no N x N or b x N matrix. ``epsilon > 0`` draws the cell from ``softmax(-(c - g) / epsilon)``.

Two ways to train: **fresh** (``draw(b)`` picks the data indices of the next batch from fresh noise, the
loader fetches them, ``coupling(x1, indices)`` returns that noise: ``SemidiscreteSampler``) and **seeded**
(``semidiscrete_fit.fill_table`` / ``SemidiscreteSeededCoupling``: each item's LOOM seeds drawn from its
own cell, refreshed every k epochs). Under DDP, ``semidiscrete_shard.ShardedSemidiscreteCoupling`` splits the
data set's rows between the ranks (``cols``: the rows this process scans; the base scans them all).
"""

from __future__ import annotations

import collections
import hashlib
import math
import os

import numpy as np
import torch

from .._device import resolve_device
from .._io import atomic_save, load_verified
from ..noise import gaussian_noise
from ..streamed import STREAM_METRICS, sq_norms, streamed_argmin
from .base import Coupling, check_flag, check_x1
from .c2ot import (
    check_cond_metric,
    check_cond_ratio,
    check_cond_weight_or_adaptive,
    cond_pair_cost,
    ratio_weight,
    stream_cond_terms,
)
from .loom.seed_stream import seed_values

_CHECK_ROWS = 1 << 14  # rows per block when scanning the data set (finite check, checksum)


def data_checksum(data) -> str:
    """Identifies a data set: its shape, dtype and up to 1024 evenly spaced rows (a full hash of 10^5 images
    would cost seconds at every load; a different data set of the same size differs in those rows)."""
    n = data.shape[0]
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(data.shape)}{str(data.dtype).replace('torch.', '')}".encode())
    for i in sorted({int(k) for k in np.linspace(0, n - 1, min(n, 1024))} if n else ()):
        row = data[i].detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data[i])
        h.update(np.ascontiguousarray(row).tobytes())
    return h.hexdigest()


def check_data_kind(data):
    """A floating tensor or numpy array (memmap) of shape ``(N, *shape)``, ``N >= 1`` (not scanned)."""
    if not isinstance(data, (torch.Tensor, np.ndarray)) or data.ndim < 2 or data.shape[0] < 1:
        raise ValueError(
            f"data must be a tensor or numpy array (memmap) of shape (N, *shape) with N >= 1, got "
            f"{getattr(data, 'shape', type(data).__name__)}"
        )
    kind = data.dtype.is_floating_point if isinstance(data, torch.Tensor) else np.issubdtype(data.dtype, np.floating)
    if not kind:
        raise TypeError(f"data must have a floating dtype, got {data.dtype}")


def check_data_finite(data, offset: int = 0):
    """Every row finite (scanned in blocks; the first bad row named, counted from ``offset``)."""
    for lo in range(0, data.shape[0], _CHECK_ROWS):
        blk = data[lo : lo + _CHECK_ROWS]
        ok = torch.isfinite(blk).reshape(len(blk), -1).all(1) if isinstance(data, torch.Tensor) else None
        if ok is None:
            ok = torch.from_numpy(np.isfinite(np.asarray(blk)).reshape(len(blk), -1).all(1))
        if not bool(ok.all()):
            raise ValueError(f"data contains NaN or inf (row {offset + lo + int((~ok).nonzero()[0, 0])}): refused")


class SemidiscreteCoupling(Coupling):
    """Semidiscrete OT between the Gaussian and a data set: ``fit`` the potential, then ``draw`` and call.

    Args:
        data: ``(N, *shape)`` floating tensor (resident, on ``device``) or numpy array / ``np.memmap`` (read tile
            by tile by every pass, never copied).
        epsilon: 0 (the hard cell, default) or ``> 0``: the cell drawn from ``softmax(-(c - g) / epsilon)``
            (absolute, in the cost's units).
        metric: ``"sqeuclidean"`` or ``"inner"`` (``c = -<z, x>``, maximum inner product).
        labels: ``(N,)`` integer classes of the data: each class has its own cells (noise of class k only goes
            to items of class k); ``num_classes`` (optional) makes a class without items an error.
        cond, cond_weight, cond_metric, cond_ratio: ``(N, Dc)`` continuous conditions; pairing noise that
            carries ``c`` with item j costs ``c(z, x_j) + cond_weight * d(c, cond_j)`` (``d``: squared
            Euclidean or ``"cosine"``); ``cond_weight="adaptive"`` sets it at construction so the condition is
            the fraction ``cond_ratio`` of the mean cost of random pairs (C2OT).
        seed: keys the fresh noise (``seed_values(seed, counter)``, a counter checkpointed in ``state_dict``)
            and the Gumbel draws.

    ``coupling(x1, indices)`` returns the noise that ``draw`` (or ``SemidiscreteSampler``) drew for exactly
    these indices (``x0=`` refused): ``(x0, x1)``, or ``(x0, x1, perm)`` with ``perm = arange(b)`` (noise i was
    drawn for position i). ``stats``: ``pre_cost`` (the batch's cost paired with another item's noise, an
    independent pairing), ``post_cost``, ``swaps`` (b).

    Example::

        sd = SemidiscreteCoupling(data, seed=0)
        sd.fit()   # to 5% RMS mass deviation or 20,000 steps; sd.fit_report says which
        idx = sd.draw(64)                          # the indices of the next batch
        x0, x1 = sd(data[idx], idx)
    """

    def __init__(
        self,
        data,
        *,
        epsilon: float = 0.0,
        metric: str = "sqeuclidean",
        labels: torch.Tensor | None = None,
        num_classes: int | None = None,
        cond: torch.Tensor | None = None,
        cond_weight=1.0,
        cond_metric: str = "sqeuclidean",
        cond_ratio: float = 0.5,
        seed: int = 0,
        device=None,
    ):
        check_data_kind(data)
        if (
            isinstance(epsilon, bool)
            or not isinstance(epsilon, (int, float))
            or not epsilon >= 0
            or math.isinf(epsilon)
        ):
            raise ValueError(f"epsilon must be a finite float >= 0 (0: the hard cell), got {epsilon!r}")
        if metric not in STREAM_METRICS:
            raise ValueError(f"metric must be one of {STREAM_METRICS}, got {metric!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.device = data.device if isinstance(data, torch.Tensor) and device is None else resolve_device(device)
        if isinstance(data, torch.Tensor) and data.device != self.device:
            raise ValueError(f"data is on {data.device} but device={self.device}: move it or pass device={data.device}")
        self.epsilon, self.metric, self.seed = float(epsilon), metric, seed
        self._bind_data(data)
        self.labels, self.classes = self._check_labels(labels, num_classes)
        self.cond_metric = check_cond_metric(cond_metric)
        self.cond = self._check_cond(cond)
        self.cond_weight = check_cond_weight_or_adaptive(cond_weight)
        if self.cond_weight == "c2ot":
            raise ValueError(
                "cond_weight='c2ot' is refused by SemidiscreteCoupling: C2OT's rule compares each pair with its "
                "item's independent pair within one batch, and the semidiscrete map has no batch (its noise is "
                "drawn against the whole data set); pass a number or 'adaptive' (set once from random pairs)"
            )
        self.cond_ratio = check_cond_ratio(cond_ratio)
        if self.cond_weight == "adaptive":
            self.cond_weight = self._adaptive_weight() if self.cond is not None else 1.0
        self.g = torch.zeros(self.num_points, device=self.device, dtype=torch.float32)
        self.counter = 0  # fresh-noise seeds used so far (each draw takes the next ones)
        self.fit_steps = 0
        self.fit_report: dict = {}
        self.fit_state: dict = {}  # the ascent's iterate and step scale (semidiscrete_fit.fit)
        self._pending = collections.deque()  # (indices, seeds, cond rows) drawn, not yet coupled
        self.stats = {}

    # -- arguments --------------------------------------------------------------------------------

    process_group = None  # the ranks sharing the data set's scan (semidiscrete_shard.py); None: this process alone

    def _bind_data(self, data):
        """Sets ``data`` (the rows this process scans: ``cols``, global numbers), ``num_points``, ``shape``,
        ``checksum`` and ``x_sqnorm`` (of the scanned rows)."""
        check_data_finite(data)
        self.data, self.num_points = data, int(data.shape[0])
        self.cols = (0, self.num_points)
        self.shape = tuple(int(s) for s in data.shape[1:])
        self.checksum = data_checksum(data)
        self.x_sqnorm = self.sq_norms(data)

    def sq_norms(self, data):
        """``|x_j|^2`` of ``data``'s rows for the sqeuclidean metric (float64 data: float64, the pass's dtype)."""
        if self.metric != "sqeuclidean":
            return None
        wide = str(data.dtype).replace("torch.", "") == "float64"
        return sq_norms(data, self.device, torch.float64 if wide else torch.float32)

    def _check_labels(self, labels, num_classes):
        if labels is None:
            return None, None
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor of shape (N,), got {getattr(labels, 'dtype', labels)!r}")
        if labels.shape != (self.num_points,):
            raise ValueError(f"labels must have shape (N,) = ({self.num_points},), got {tuple(labels.shape)}")
        labels = labels.to(self.device, torch.int64)
        classes = torch.unique(labels)
        if num_classes is not None:
            empty = sorted(set(range(int(num_classes))) - set(classes.tolist()))
            if empty:
                raise ValueError(f"labels: class {empty[0]} of num_classes={num_classes} has no item (an empty class)")
        return labels, classes

    def _check_cond(self, cond):
        if cond is None:
            return None
        if not isinstance(cond, torch.Tensor) or not cond.is_floating_point():
            raise TypeError("cond must be a floating tensor of shape (N, Dc) or (N,)")
        if cond.dim() not in (1, 2) or cond.shape[0] != self.num_points:
            raise ValueError(
                f"cond must have shape (N, Dc) or (N,) with N = {self.num_points}, got {tuple(cond.shape)}"
            )
        if not bool(torch.isfinite(cond).all()):
            raise ValueError("cond contains NaN or inf: refused")
        return (cond[:, None] if cond.dim() == 1 else cond).to(self.device, torch.float32)

    def _adaptive_weight(self, pairs: int = 4096) -> float:
        """C2OT's ratio on random (noise, item) pairs: ``w E[d] / (E[c] + w E[d]) = cond_ratio``."""
        gen = torch.Generator().manual_seed(self.seed)
        i = torch.randint(self.num_points, (pairs,), generator=gen)
        j = torch.randint(self.num_points, (pairs,), generator=gen)
        z = torch.randn((pairs, int(np.prod(self.shape))), generator=gen).to(self.device)
        x = self.rows(j).flatten(1).float()
        c = (z - x).square().sum(1) if self.metric == "sqeuclidean" else -(z * x).sum(1)
        d = cond_pair_cost(self.cond[i].double(), self.cond[j].double(), self.cond_metric).diagonal()
        w = ratio_weight(float(c.double().mean()), float(d.mean()), self.cond_ratio)
        return 0.0 if w is None else w

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Data rows ``idx`` as a tensor on ``device`` (a gather from a memmap reads only these rows)."""
        if isinstance(self.data, torch.Tensor):
            return self.data[idx.to(self.data.device)]
        return torch.from_numpy(np.asarray(self.data[idx.cpu().numpy()])).to(self.device)

    # -- the assignment ---------------------------------------------------------------------------

    def noise_conditions(self, b: int, labels=None, cond=None, start: int | None = None):
        """The (labels, cond) the noise of a draw carries: given, or those of random items (the marginals),
        keyed by the draw's first seed number ``start`` (default: the counter)."""
        if labels is not None:
            if self.labels is None:
                raise ValueError("labels: this coupling was built without labels (pass labels= to the constructor)")
            labels = torch.as_tensor(labels).to(self.device, torch.int64)
            if labels.shape != (b,):
                raise ValueError(f"labels must have shape (b,) = ({b},), got {tuple(labels.shape)}")
            absent = ~torch.isin(labels, self.classes)
            if bool(absent.any()):
                raise ValueError(f"labels: class {int(labels[absent][0])} is absent from the fitted cells")
        need_random = (self.labels is not None and labels is None) or (self.cond is not None and cond is None)
        if need_random:
            start = self.counter if start is None else start
            gen = torch.Generator().manual_seed(int(seed_values(self.seed ^ 0x5D, start, 1)[0]))
            src = torch.randint(self.num_points, (b,), generator=gen).to(self.device)
            if labels is None and self.labels is not None:
                labels = self.labels[src]
            if cond is None and self.cond is not None:
                cond = self.cond[src]
        if cond is not None:
            if self.cond is None:
                raise ValueError("cond: this coupling was built without cond (pass cond= to the constructor)")
            cond = torch.as_tensor(cond, device=self.device, dtype=torch.float32).reshape(b, -1)
            if cond.shape[1] != self.cond.shape[1] or not bool(torch.isfinite(cond).all()):
                raise ValueError(f"cond must be finite with shape (b, {self.cond.shape[1]}), got {tuple(cond.shape)}")
        return labels, cond

    def assign(self, z: torch.Tensor, *, labels=None, cond=None, epsilon=None, seed=None, g=None):
        """``(value, index)``: the cell of each noise row ``z (b, D)`` (the streamed argmin of
        ``c(z, x_j) + cond_weight d(cond, cond_j) - g_j``, masked to the row's class)."""
        lo, hi = self.cols  # the columns this process scans (all of them without a process group)
        g = (self.g if g is None else g)[lo:hi]
        eps = self.epsilon if epsilon is None else epsilon
        aux = lab = None
        if labels is not None:
            lab = (labels, self.labels[lo:hi])
        if cond is not None and self.cond_weight > 0:
            aux, col_term, row_term = stream_cond_terms(cond, self.cond[lo:hi], self.cond_weight, self.cond_metric)
            g = g - col_term
        value, idx = streamed_argmin(
            z.flatten(1), self.data, g, metric=self.metric, epsilon=eps, seed=self.seed * 1_000_003 + (
                self.counter if seed is None else seed),
            offset=lo, x_sqnorm=self.x_sqnorm, aux=aux, labels=lab, process_group=self.process_group,
        )  # fmt: skip
        if aux is not None:
            value = value + row_term.to(value.dtype)
        return value, idx

    def draw(self, b: int, *, labels=None, cond=None, part: tuple = (0, 1)) -> torch.Tensor:
        """The data indices ``(b,)`` (int64, CPU) of the next batch: ``b`` fresh noises, each sent to its cell.

        The noise is remembered until ``coupling(x1, indices)`` asks for it (draws queue up in order, so a
        DataLoader's prefetching sampler works). ``labels``/``cond`` (b,) / (b, Dc): what each noise is
        generated for (random items' by default). ``part=(rank, world)``: this rank's share of a global batch of
        ``world * b`` noises (every rank advances the counter alike, no communication)."""
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"b must be an int >= 1, got {b!r}")
        rank, world = part
        start = self.counter + rank * b
        labels, cond = self.noise_conditions(b, labels, cond, start)
        seeds = torch.from_numpy(seed_values(self.seed, start, b))
        z = gaussian_noise(seeds, self.shape, device=self.device)
        _, idx = self.assign(z, labels=labels, cond=cond, seed=start)
        self.counter += world * b
        idx = idx.cpu()
        self._pending.append((idx, seeds))
        return idx

    def __call__(self, x1, indices=None, *, x0=None, labels=None, cond=None, return_indices: bool = False):  # noqa: ARG002 - labels/cond: fixed at draw
        """``(x0, x1)``: the noise ``draw`` drew for ``indices`` (the oldest pending draw; they must match)."""
        check_x1(x1)
        check_flag(return_indices, "return_indices")
        if x0 is not None:
            raise ValueError("SemidiscreteCoupling draws its own noise: x0 must be None")
        if not self._pending:
            raise ValueError(
                "SemidiscreteCoupling pairs the batches it chose: call idx = coupling.draw(b) (or iterate a "
                "SemidiscreteSampler), load x1 = data[idx], then coupling(x1, idx)"
            )
        idx, seeds = self._pending[0]
        got = None if indices is None else torch.as_tensor(indices).cpu()
        if got is None or got.shape != idx.shape or not bool((got.to(torch.int64) == idx).all()):
            raise ValueError(
                f"indices must be the {len(idx)} indices of the oldest pending draw (draws are coupled in order), got "
                f"{None if got is None else tuple(got.shape)}"
            )
        self._pending.popleft()
        x0 = gaussian_noise(seeds, x1.shape[1:], device=x1.device, dtype=x1.dtype)
        c = (x1 - x0).flatten(1).float().square().sum(1)
        pre = (x1 - x0.roll(1, 0)).flatten(1).float().square().sum(1)
        self.stats = {"pre_cost": pre.double().mean(), "post_cost": c.double().mean(), "swaps": torch.tensor(len(idx))}
        perm = torch.arange(len(idx), device=x1.device)
        return (x0, x1, perm) if return_indices else (x0, x1)

    # -- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The potential and everything that must match to reuse it: N, the data checksum, the settings."""
        return {
            "g": self.g.detach().cpu().clone(),
            "num_points": self.num_points,
            "data_checksum": self.checksum,
            "epsilon": self.epsilon,
            "metric": self.metric,
            "cond_weight": float(self.cond_weight),
            "counter": self.counter,
            "fit_steps": self.fit_steps,
            "fit_report": dict(self.fit_report),
            "fit_state": {
                k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in self.fit_state.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; a potential fitted on another data set (size or checksum) is refused and
        nothing is changed."""
        if not isinstance(state, dict) or "g" not in state:
            raise ValueError("state must be a SemidiscreteCoupling.state_dict() (a dict with 'g')")
        if state.get("num_points") != self.num_points:
            raise ValueError(
                f"state: the potential was fitted on a data set of {state.get('num_points')} items, this one has "
                f"{self.num_points}"
            )
        if state.get("data_checksum") != self.checksum:
            raise ValueError("state: the potential was fitted on another data set (checksum mismatch): refused")
        for key in ("metric", "epsilon"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"state: {key} {state.get(key)!r} differs from this coupling's {getattr(self, key)!r}")
        g = state["g"]
        if not isinstance(g, torch.Tensor) or g.shape != (self.num_points,) or not bool(torch.isfinite(g).all()):
            raise ValueError(f"state['g'] must be a finite tensor of shape ({self.num_points},)")
        self.g = g.to(self.device, torch.float32).clone()
        self.cond_weight = float(state.get("cond_weight", self.cond_weight))
        self.counter, self.fit_steps = int(state["counter"]), int(state["fit_steps"])
        self.fit_report = dict(state.get("fit_report", {}))
        self.fit_state = {
            k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in state.get("fit_state", {}).items()
        }
        self._pending.clear()

    def save(self, path: str | os.PathLike) -> None:
        """Write ``state_dict()`` atomically, checksummed."""
        atomic_save(self.state_dict(), os.fspath(path))

    def load(self, path: str | os.PathLike) -> None:
        """Load a ``save``d potential (verified; refused if fitted on another data set)."""
        self.load_state_dict(load_verified(os.fspath(path)))

    def fit(self, steps: int = 2000, **kw) -> dict:
        """Fit (or continue fitting) ``g``: ``semidiscrete_fit.fit``'s arguments; returns the convergence report."""
        from .semidiscrete_fit import fit

        return fit(self, steps, **kw)

    def __repr__(self):
        return (
            f"SemidiscreteCoupling(num_points={self.num_points}, shape={self.shape}, epsilon={self.epsilon}, "
            f"metric={self.metric!r}, fit_steps={self.fit_steps})"
        )
