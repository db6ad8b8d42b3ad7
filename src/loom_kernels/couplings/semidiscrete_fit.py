"""Fitting the semidiscrete potential, and the two ways to train with it (fresh noise, seeded LOOM table).

``fit``: averaged stochastic ascent on the semi-dual ``H(g) = E_z[min_j c(z, x_j) - g_j] + mean_j g_j``
(SD-FM, Mousavi-Hosseini et al., ICLR 2026; the averaging and the decreasing regularisation DRAG of Genans,
Godichon-Baggioni, Vialard, Wintenberger, "Stochastic optimization in semi-discrete OT", NeurIPS 2025): each
step draws a fresh noise batch, finds the cells by the streamed argmin (a Gumbel-max draw of the soft cell
while ``eps_t = max(epsilon, eps0 / sqrt(t))`` is positive: an unbiased estimate of the entropic gradient),
and moves ``g`` by Adam's normalised step on the cells' relative mass errors ``1 - N count_j / b`` (as the
optimisers ott-jax's ``SemidiscreteSolver`` takes), of size ``lr * gap``: ``gap`` the mean gap between a
noise's smallest and second-smallest reduced cost, measured again at steps 1, 2, 4, ... (at ``g = 0`` the
gaps of 8gaussians are 0.49, ~0.01 once balanced), constant for 256 noises per cell, then decaying as
``t^-1/2``. The average of the iterates weighted by t is the fitted ``g``. Against the previous step
(plain SGD of ``lr * gap / sqrt(t)``, the gap measured once at ``g = 0``), the 2-D study sets at N = 1,024
(seed 0), 20,000 steps of 256, RMS mass deviation on 65,536 fresh noises: 0.054 / 0.023 / 0.034 (lr 1;
lr 2: 0.088 / 0.047 / 0.041) instead of 0.66 / 0.100 / 0.088 at the old step's best lr of 1-64 (4) for
8gaussians / moons / checkerboard.

Stopping: ``tol`` is checked every ``check_every`` steps on fresh noise (``mass_deviation``: each check an
evaluation stream of its own, ``g`` fixed), never on the fit's own draws: over a window those read
balanced whatever the potential (the iterate reacts to the very counts it is measured on: 0 where fresh
noise measured 0.28, 126 steps at N = 2,000, D = 784). They are kept, as ``semi_dual`` (the estimate of
``H``) and ``mass_dev`` per window, in ``fit_report["history"]``. ``fit_report["stopped"]`` says why the
fit ended, ``fit_report["check"]`` holds the last check.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..noise import gaussian_noise
from .loom.seed_stream import seed_values


def _gap_scale(sd, g=None, b: int = 64, rows: int = 8192) -> float:
    """Mean gap between the smallest and second-smallest reduced cost ``c(z, x_j) - g_j`` of ``b`` noises over
    the whole data set: the scale of the potential's steps (a cell boundary moves by about this much per unit
    of ``g``). Measured again as ``g`` evolves (the gaps at ``g = 0`` can be 20x those of the balanced cells:
    8gaussians, 0.49 against ~0.01)."""
    n = sd.num_points
    if n < 2:
        return 1.0
    gen = torch.Generator().manual_seed(sd.seed + sd.fit_steps)
    z = torch.randn((b, math.prod(sd.shape)), generator=gen).to(sd.device)
    two = torch.full((b, 2), math.inf, device=sd.device)
    for lo in range(0, n, rows):
        x = sd.rows(torch.arange(lo, min(n, lo + rows))).flatten(1).float()
        c = torch.cdist(z, x).square() if sd.metric == "sqeuclidean" else -(z @ x.T)
        if g is not None:
            c = c - g[lo : lo + rows].float()[None]
        low = c.topk(min(2, c.shape[1]), dim=1, largest=False).values
        two = torch.cat([two, low], 1).topk(2, 1, largest=False).values
    gap = float((two[:, 1] - two[:, 0]).mean())
    return gap if 0 < gap < math.inf else 1.0


def _report(sd, counts, val_sum, w):
    n = sd.num_points
    p = counts.double() / w
    sq = float(((n * p - 1.0) ** 2).mean()) - n / w
    return {
        "semi_dual": float(val_sum / w + sd.g.double().mean()),
        "mass_dev": math.sqrt(max(sq, 0.0)),
        "mass_dev_floor": math.sqrt(math.sqrt(2.0 / n) * n / w),
        "samples": int(w),
        "fit_steps": sd.fit_steps,
    }


def _check_samples(n: int, tol: float) -> int:
    """Fresh noises for a check whose noise floor ``sqrt(sqrt(2 N) / M)`` is ``tol / 3``: ``M = 9 sqrt(2 N) / tol^2``
    (the debiased estimate; the raw RMS count error would need ``M = 9 N / tol^2``)."""
    return max(n, math.ceil(9.0 * math.sqrt(2.0 * n) / tol**2))


def _converged(rep: dict, tol: float) -> bool:
    """The check's estimate is two of its standard deviations below ``tol^2`` (in squared units:
    ``sqrt(2 N / M^2 + 4 dev^2 / M)``): a fit whose masses are ``tol`` off stops early about 2% of the time."""
    n, m, sq = rep["num_points"], rep["samples"], rep["mass_dev"] ** 2
    return sq + 2.0 * math.sqrt(2.0 * n / m**2 + 4.0 * sq / m) <= tol**2


def fit(
    sd,
    steps: int = 20_000,
    *,
    tol: float | None = 0.05,
    batch_size: int = 256,
    lr: float = 1.0,
    lr_decay: float = 0.5,
    decay_after: int | None = None,
    eps0: float = 0.0,
    window: int | None = None,
    check_every: int | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
) -> dict:
    """Run at most ``steps`` more ascent steps on ``sd.g``, stopping once the cells' masses are within ``tol``
    (resumes where the last fit or loaded state stopped). ``sd.fit_report["stopped"]`` says why it stopped:
    ``"tol"`` (a fresh-noise check passed), ``"steps"`` (the maximum ran out) or ``"diverged"``.

    Args:
        tol: the target RMS relative deviation of the cell masses from 1/N (default 0.05; None: run every step).
            Every ``check_every`` steps the averaged ``g`` is measured on ``M = 9 sqrt(2N) / tol^2`` fresh noises
            (``mass_deviation``, an evaluation stream of its own, new noise at each check; noise floor ``tol / 3``)
            and the fit stops when that estimate is two standard deviations below ``tol``. The fit's own hits are
            not used: the iterate reacts to them, so they read balanced long before the potential is.
        batch_size: fresh noises per step.
        lr: the step in units of the gap scale (the mean gap between a noise's smallest and second-smallest
            reduced cost, measured again at steps 1, 2, 4, 8, ...): Adam's normalised step (moments 0.9,
            0.999) on the cells' relative mass errors ``1 - N count_j / b``, times ``lr * gap``.
        lr_decay, decay_after: the step is constant for ``decay_after`` steps (default ``256 N / b``: 256 noises
            per cell), then falls as ``(decay_after / t)^lr_decay``. The fitted ``g`` is the average of the iterates
            weighted by t (forgets the start).
        eps0: the DRAG regularisation's start, in gaps (default 0, off: on the CPU the Gumbel draws cost more than
            they saved in the 2-D trials; the target is ``sd.epsilon``).
        window: steps per window of the fit's own counts (default: enough for ``16 N`` samples): ``semi_dual``
            and the (optimistic) ``mass_dev`` in ``sd.fit_report["history"]``.
        check_every: steps between the fresh-noise checks (default: 5 checks' noises, so checks cost ~20%).
        progress: a tqdm bar with the last numbers.
        checkpoint, checkpoint_every: ``sd.save(checkpoint)`` every that many steps and at the end.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    for name, v in (("batch_size", batch_size), ("decay_after", decay_after), ("check_every", check_every)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be an int >= 1{'' if name == 'batch_size' else ' or None'}, got {v!r}")
    for name, v in (("lr", lr), ("eps0", eps0), ("lr_decay", lr_decay)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf or (name == "lr" and v == 0):
            raise ValueError(f"{name} must be a finite float {'> 0' if name == 'lr' else '>= 0'}, got {v!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < math.inf):
        raise ValueError(f"tol must be a finite float > 0 (the RMS relative mass deviation) or None, got {tol!r}")
    n, b = sd.num_points, batch_size
    window = window or max(1, -(-16 * n // b))
    decay_after = decay_after or max(1, 256 * n // b)
    m_check = _check_samples(n, tol) if tol is not None else 0
    check_every = check_every or max(1, -(-5 * m_check // b))
    st = sd.fit_state
    if "g_iter" not in st:
        st.update(g_iter=sd.g.clone(), m=torch.zeros_like(sd.g), v=torch.zeros_like(sd.g), checks=0)
    g_iter, mom, sec = st["g_iter"].to(sd.device), st["m"].to(sd.device), st["v"].to(sd.device)
    history = list(sd.fit_report.get("history", []))
    counts = torch.zeros(n, dtype=torch.int64, device=sd.device)
    val_sum, w, stopped, check = 0.0, 0, "steps", sd.fit_report.get("check")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="semidiscrete fit", dynamic_ncols=True)
    for _ in range(steps):
        t = sd.fit_steps + 1
        if t & (t - 1) == 0 or "scale" not in st:  # t a power of 2: the cells have changed since the last measure
            st["scale"] = _gap_scale(sd, sd.g)
        scale = st["scale"]
        eps_t = max(sd.epsilon, eps0 * scale / math.sqrt(t))
        labels, cond = sd.noise_conditions(b)
        z = gaussian_noise(torch.from_numpy(seed_values(sd.seed, sd.counter, b)), sd.shape, device=sd.device)
        value, idx = sd.assign(z, labels=labels, cond=cond, epsilon=eps_t, g=g_iter)
        sd.counter += b
        hits = torch.bincount(idx, minlength=n)
        grad = 1.0 - hits.float() * (n / b)
        mom.mul_(0.9).add_(grad, alpha=0.1)
        sec.mul_(0.999).addcmul_(grad, grad, value=0.001)
        step = lr * scale * min(1.0, decay_after / t) ** lr_decay
        g_iter += step * (mom / (1 - 0.9**t)) / ((sec / (1 - 0.999**t)).sqrt() + 1e-8)
        sd.g += (g_iter - sd.g) * (2.0 / (t + 1))  # the average of the iterates weighted by t (forgets the start)
        sd.fit_steps = t
        counts += hits
        val_sum += float(value.double().sum())
        w += b
        if t % window == 0:
            rep = _report(sd, counts, val_sum, w)
            history.append(rep)
            counts.zero_()
            val_sum, w = 0.0, 0
            sd.fit_report = {**rep, "history": history, "check": check}
            if not math.isfinite(rep["semi_dual"]):
                stopped = "diverged"
                break
        if tol is not None and t % check_every == 0:
            check = mass_deviation(sd, m_check, stream=st["checks"] + 1)
            st["checks"] += 1
            sd.fit_report = {**sd.fit_report, "check": check}
            if bar is not None:
                bar.set_postfix(mass_dev=f"{check['mass_dev']:.4f}", refresh=False)
            if _converged(check, tol):
                stopped = "tol"
                break
        if checkpoint is not None and checkpoint_every and t % checkpoint_every == 0:
            sd.save(checkpoint)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    st.update(g_iter=g_iter, m=mom, v=sec)
    sd.fit_report = {
        **sd.fit_report, "fit_steps": sd.fit_steps, "stopped": stopped, "tol": tol, "check": check, "history": history,
    }  # fmt: skip
    if checkpoint is not None:
        sd.save(checkpoint)
    return sd.fit_report


def mass_deviation(sd, samples: int | None = None, batch_size: int = 1024, *, stream: int = 0) -> dict:
    """The fitted ``g``'s cell masses on ``samples`` fresh noises (default ``8 N``), not the fit's draws:
    ``{"mass_dev", "mass_dev_floor", "semi_dual", "samples", "num_points"}`` (as ``fit_report``). ``mass_dev``
    is the RMS relative deviation of the masses from 1/N, debiased for the sampling noise ``N / M`` (0 for an
    exact potential whatever M is); ``mass_dev_floor`` ``sqrt(sqrt(2 N) / M)`` is that estimate's noise:
    deviations below it are not resolved. Leaves the coupling's noise counter where it was (an evaluation
    stream of its own; ``stream`` picks another one, e.g. each of the fit's checks its own)."""
    n = sd.num_points
    samples = samples or 8 * n
    counts = torch.zeros(n, dtype=torch.int64, device=sd.device)
    val_sum, done = 0.0, 0
    base = (sd.seed ^ 0xE7A1) + 1_000_003 * stream
    while done < samples:
        b = min(batch_size, samples - done)
        labels, cond = sd.noise_conditions(b, start=(1 << 48) + (stream << 40) + done)
        seeds = torch.from_numpy(seed_values(base, done, b))
        value, idx = sd.assign(gaussian_noise(seeds, sd.shape, device=sd.device), labels=labels, cond=cond)
        counts += torch.bincount(idx, minlength=n)
        val_sum += float(value.double().sum())
        done += b
    return {**_report(sd, counts, val_sum, done), "num_points": n}


def exact_masses_1d(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Exact Gaussian masses of the Laguerre cells of 1-D points (squared Euclidean): a test reference."""
    from math import erf

    order = np.argsort(x)
    xs, gs = x[order].astype(np.float64), g[order].astype(np.float64)
    masses = np.zeros(len(x))
    # cell j = {z: (z - x_j)^2 - g_j <= (z - x_k)^2 - g_k for all k}: an interval found by the lower envelope
    zs = np.linspace(-9, 9, 400_001)
    cell = np.argmin((zs[:, None] - xs[None, :]) ** 2 - gs[None, :], axis=1)
    edges = np.flatnonzero(np.diff(cell)) + 1
    bounds = np.concatenate([[-np.inf], (zs[edges - 1] + zs[edges]) / 2, [np.inf]])
    phi = np.vectorize(lambda v: 0.5 * (1 + erf(v / math.sqrt(2))))
    for k, j in enumerate(cell[np.r_[0, edges]]):
        masses[j] += phi(bounds[k + 1]) - phi(bounds[k])
    out = np.zeros(len(x))
    out[order] = masses
    return out
