"""Validation of a Sinkhorn problem and the one dispatch point between the Triton kernels, the
fused C++ CPU kernel (``_cpu``, ``loom_kernels.streamed``) and the blocked torch path (``Problem.lse`` /
``Problem.argmax``)."""

from __future__ import annotations

import math

import torch

from .._triton import use_kernel
from . import _cpu, _kernels, _tiles

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_tensor(name, t, ndims, what):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {what}, got {type(t).__name__}")
    if t.ndim not in ndims:
        raise ValueError(f"{name} must have shape {what}, got {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite: it holds NaN or inf")


def _check_range(max_cost: torch.Tensor, dtype: torch.dtype, name: str, what: str) -> None:
    """Refuses costs that overflow the solver's dtype (with headroom for the potentials added to them).

    In float32 a cost past ~1e38 turns every ``(g_j - C_ij) / eps`` into inf - inf: the solver then
    ran to max_iter and drew one column for every row, with no other sign."""
    limit = torch.finfo(dtype).max / 64
    worst = float(max_cost.max())
    if not math.isfinite(worst) or worst > limit:
        hint = "scale the data down, or pass float64 points/cost" if dtype != torch.float64 else "scale the data down"
        raise ValueError(
            f"{name} hold {what} overflow {str(dtype).replace('torch.', '')} (largest cost {worst:.3g}, the "
            f"limit is {limit:.3g}): {hint}"
        )


def _weights(name, w, batch, size, device, dtype, allow_empty=False):
    """log-weights ``(B, size)`` (``-inf`` where a weight is 0) and the masses ``(B,)`` float64."""
    if w is None:
        return torch.full((batch, size), -math.log(size), device=device, dtype=dtype), torch.ones(
            batch, dtype=torch.float64, device=device
        )
    _check_tensor(name, w, (1, 2), f"({size},) or ({batch}, {size})")
    if w.shape[-1] != size or (w.ndim == 2 and w.shape[0] != batch):
        raise ValueError(f"{name} must have shape ({size},) or ({batch}, {size}), got {tuple(w.shape)}")
    if w.device != device:
        raise ValueError(f"{name} must be on {device}, got {w.device}")
    if bool((w < 0).any()):
        raise ValueError(f"{name} must be non-negative")
    w = w.to(torch.float64).expand(batch, size)
    mass = w.sum(-1)
    if not allow_empty and bool((mass <= 0).any()):  # allow_empty: a row shard (the total is checked later)
        raise ValueError(f"{name} must have a positive sum in every problem")
    return torch.log(w).to(dtype), mass


class Problem:
    """A validated problem: geometry tiles, log-weights ``(B, n)``/``(B, m)``, masses and scales.

    Points are centred on their common mean (the cost is translation invariant) so that the Gram
    identity inside the tiles cancels as little as possible; the potentials are those of the
    original cost.
    """

    def __init__(self, x=None, y=None, cost=None, a=None, b=None, allow_tf32=False, row_shard=False):
        if cost is None:
            self._init_points(x, y)
        else:
            self._init_cost(cost)
        B, n, m = self.geo.shape
        if n == 0 or m == 0:
            raise ValueError(f"need at least one point on each side, got n={n}, m={m}")
        self.shape = (B, n, m)
        self.geo_t = self.geo.transposed()
        self.log_a, self.mass_a = _weights("a", a, B, n, self.device, self.dtype, allow_empty=row_shard)
        self.log_b, self.mass_b = _weights("b", b, B, m, self.device, self.dtype)
        self.allow_tf32 = allow_tf32

    def _init_points(self, x, y):
        what = "(n, D) or (B, n, D)"
        _check_tensor("x", x, (2, 3), what)
        _check_tensor("y", y, (2, 3), what.replace("n", "m"))
        if x.device != y.device:
            raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
        if x.ndim != y.ndim or x.shape[-1] != y.shape[-1] or (x.ndim == 3 and x.shape[0] != y.shape[0]):
            raise ValueError(f"x and y must have the same batch size and D, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[-2] == 0 or y.shape[-2] == 0:
            raise ValueError(f"need at least one point on each side, got x {tuple(x.shape)} and y {tuple(y.shape)}")
        self.batched = x.ndim == 3
        self.device = x.device
        self.dtype = torch.float64 if (x.dtype == torch.float64 and y.dtype == torch.float64) else torch.float32
        x3 = (x if self.batched else x[None]).to(self.dtype)
        y3 = (y if self.batched else y[None]).to(self.dtype)
        # the common centre in float64: the mean of all points of each problem
        n, m = x3.shape[1], y3.shape[1]
        mu_x, mu_y = x3.mean(1, dtype=torch.float64), y3.mean(1, dtype=torch.float64)  # (B, D)
        centre = (n * mu_x + m * mu_y) / (n + m)
        xc = (x3 - centre[:, None].to(self.dtype)).contiguous()
        yc = (y3 - centre[:, None].to(self.dtype)).contiguous()
        self.geo = _tiles.PointTiles(xc, yc)
        # mean_ij |x_i - y_j|^2 = mean|x - c|^2 + mean|y - c|^2 - 2 (mu_x - c).(mu_y - c): O((n + m) D),
        # little cancellation as c lies between the means
        dx, dy = mu_x - centre, mu_y - centre
        self.mean_cost = (
            self.geo.xx.double().mean(1) + self.geo.yy.double().mean(1) - 2 * (dx * dy).sum(-1)
        ).clamp_min(0)
        # (max |x - c| + max |y - c|)^2 bounds every cost: where epsilon scaling starts
        self.max_cost = (self.geo.xx.double().amax(1).sqrt() + self.geo.yy.double().amax(1).sqrt()) ** 2
        _check_range(self.max_cost, self.dtype, "x and y", "values so large that the squared distances")
        self.kernel = use_kernel(self.device) and self.dtype == torch.float32

    def _cpu_kernel(self):
        """Points in float32 on the CPU (Triton not asked for): the C++ tile kernel."""
        points = isinstance(self.geo, _tiles.PointTiles)
        return not self.kernel and points and _cpu.available(self.device, self.dtype)

    def _init_cost(self, cost):
        _check_tensor("cost", cost, (2, 3), "(n, m) or (B, n, m)")
        self.batched = cost.ndim == 3
        self.device = cost.device
        self.dtype = torch.float64 if cost.dtype == torch.float64 else torch.float32
        c = (cost if self.batched else cost[None]).to(self.dtype)
        self.mean_cost = c.double().mean((1, 2))
        self.max_cost = cost.double().abs().amax((-2, -1)).reshape(-1)
        _check_range(self.max_cost, self.dtype, "cost", "entries so large that they")
        self.geo = _tiles.CostTiles(c)
        self.kernel = False  # a stored cost is read by the torch tiles on every device

    # ---- the two reductions the solver and the sampler need -----------------------------------

    def lse(self, g: torch.Tensor, eps: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``LSE_j((g_j - C_ij) / eps)`` ``(B, n)`` (or over i, ``(B, m)``, when ``transpose``)."""
        geo = self.geo_t if transpose else self.geo
        u, scale, r = geo.terms(g, eps)
        if self.kernel:
            out = _kernels.lse(geo.x, geo.y, u.contiguous(), scale.contiguous(), self.allow_tf32)
        elif self._cpu_kernel():
            out = _cpu.lse(geo.x, geo.y, u, scale)
        else:
            out = _tiles.row_lse(geo, u, scale)
        return out + r

    def argmax(self, g: torch.Tensor, eps: torch.Tensor, seed: int | None) -> torch.Tensor:
        """int64 ``(B, n)``: ``argmax_j((g_j - C_ij) / eps + Gumbel(seed, b, i, j))`` (no noise if seed is None)."""
        u, scale, _ = self.geo.terms(g, eps)
        B, n, m = self.shape
        ki = None if seed is None else _tiles.row_keys(seed, B, n, self.device)
        kj = None if seed is None else _tiles.col_keys(m, self.device)
        if self.kernel:
            return _kernels.argmax(self.geo.x, self.geo.y, u.contiguous(), scale.contiguous(), ki, kj, self.allow_tf32)
        if self._cpu_kernel():
            return _cpu.argmax(self.geo.x, self.geo.y, u, scale, ki, kj)
        return _tiles.row_argmax(self.geo, u, scale, ki, kj)

    def unbatch(self, t):
        return t if (t is None or self.batched) else t[0]
