"""Time for the semidiscrete fit to reach a mass deviation, MNIST (D = 784) on the CPU, and the N = 50,000 model.

For each N: fit in doubling chunks (``tol=None``: the stop rule's checks are not timed), after each chunk measure
the averaged potential's RMS cell-mass deviation on fresh noise (``mass_deviation``; M chosen so that its noise
floor is about a third of the last value), until the deviation is under ``--target`` or the fit has used
``--seconds`` of CPU. Then: the samples to the target, read where the curve crossed it or extrapolated along
``dev = a samples^k`` fitted to the points under 0.2 (and over twice their noise floor); the time per step at each
N, and at N = 50,000 from a few timed steps; the samples to the target at 50,000 from a power law in N fitted to
the measured N, and from the rate ``dev^2 = C N / samples`` (averaged SGD's) with C read off each curve's last
resolved point. The N = 50,000 figures are a MODEL, not a measurement (the script says which numbers are which).

    PYTHONPATH=src python tools/semidiscrete_time_to_tol.py --n 1000 2000 5000 --seconds 120 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from loom_kernels.couplings.semidiscrete import SemidiscreteCoupling
from loom_kernels.couplings.semidiscrete_fit import mass_deviation
from loom_kernels.experiments.images.data import load_images


def mnist(n: int) -> torch.Tensor:
    return load_images("mnist", "train", n=n)[0].flatten(1).contiguous()


def curve(n: int, seconds: float, target: float, batch: int) -> dict:
    sd = SemidiscreteCoupling(mnist(n), seed=0)
    pts, cpu, wall, chunk, dev = [], 0.0, 0.0, 64, 1.0
    while cpu < seconds and dev > target:
        c0, w0 = time.process_time(), time.perf_counter()
        sd.fit(chunk, tol=None, batch_size=batch, progress=False)
        cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - w0
        m = max(16 * n, math.ceil(9 * math.sqrt(2 * n) / max(dev, target) ** 2))
        e0 = time.process_time()
        rep = mass_deviation(sd, m, stream=len(pts) + 1)
        dev = rep["mass_dev"]
        pts.append(
            dict(steps=sd.fit_steps, samples=sd.fit_steps * batch, fit_cpu_s=round(cpu, 2), fit_wall_s=round(wall, 2),
                 mass_dev=round(dev, 5), floor=round(rep["mass_dev_floor"], 5), eval_samples=m,
                 eval_cpu_s=round(time.process_time() - e0, 2))
        )  # fmt: skip
        print(n, pts[-1], flush=True)
        chunk = sd.fit_steps  # doubling
    return dict(n=n, points=pts, cpu_s_per_step=cpu / sd.fit_steps)


def analyse(r: dict, target: float, batch: int) -> dict:
    """Samples (and CPU seconds) to ``target``: where the curve crossed it, else along ``dev = a samples^k`` fitted
    to the points under 0.2 that are over twice their estimate's noise floor."""
    pts = r["points"]
    crossed = [p for p in pts if p["mass_dev"] <= target and p["mass_dev"] > 2 * p["floor"]]
    fit_pts = [p for p in pts if 2 * p["floor"] < p["mass_dev"] < 0.2]
    out = {k: v for k, v in r.items() if k in ("n", "points", "cpu_s_per_step")}
    if len(fit_pts) >= 2:
        k, a = np.polyfit(np.log([p["samples"] for p in fit_pts]), np.log([p["mass_dev"] for p in fit_pts]), 1)
        out.update(exponent=float(k), fit_points=len(fit_pts))
        out.update(samples_to_target=float(math.exp((math.log(target) - a) / k)), how="extrapolated (power law)")
    if crossed:
        out.update(samples_to_target=crossed[0]["samples"], how="measured (first point under the target)")
    if "samples_to_target" in out:
        out["cpu_s_to_target"] = out["samples_to_target"] / batch * r["cpu_s_per_step"]
    resolved = [p for p in pts if p["mass_dev"] > 2 * p["floor"]]
    if resolved:
        out["rate_c"] = resolved[-1]["mass_dev"] ** 2 * resolved[-1]["samples"] / r["n"]
    return out


def step_time(n: int, batch: int, steps: int = 3) -> float:
    sd = SemidiscreteCoupling(mnist(n), seed=0)
    sd.fit(1, tol=None, batch_size=batch, progress=False)  # the gap measure and first touch, not timed
    c0 = time.process_time()
    sd.fit(steps, tol=None, batch_size=batch, progress=False)
    return (time.process_time() - c0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1000, 2000, 5000])
    p.add_argument("--seconds", type=float, default=120.0, help="fit CPU seconds per N")
    p.add_argument("--target", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--model-n", type=int, default=50_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--from-json", default=None, help="analyse the curves of an earlier run's --json instead")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.from_json:
        with open(args.from_json) as f:
            old = json.load(f)
        raw, step50 = old["curves"], old["model"]["cpu_s_per_step_measured"]
    else:
        raw = [curve(n, args.seconds, args.target, args.batch) for n in args.n]
        step50 = step_time(args.model_n, args.batch)
    res = [analyse(r, args.target, args.batch) for r in raw]
    for r in res:
        print(
            f"N = {r['n']}: {r['cpu_s_per_step']:.4f} CPU s/step; samples to {args.target:g}: "
            f"{r.get('samples_to_target', float('nan')):.3g} ({r.get('how', 'no fit')}; exponent "
            f"{r.get('exponent', float('nan')):.2f}); CPU s to {args.target:g}: "
            f"{r.get('cpu_s_to_target', float('nan')):.0f}"
        )
    model = dict(n=args.model_n, cpu_s_per_step_measured=step50)
    known = [r for r in res if "samples_to_target" in r]
    if len(known) >= 2:
        q, c = np.polyfit(np.log([r["n"] for r in known]), np.log([r["samples_to_target"] for r in known]), 1)
        s = math.exp(c) * args.model_n**q
        model.update(samples_exponent_in_n=float(q), samples_to_target_model=s)
        model["cpu_s_to_target_model"] = s / args.batch * model["cpu_s_per_step_measured"]
    rates = [r["rate_c"] for r in res if "rate_c" in r]
    if rates:
        c = float(np.median(rates))
        model.update(rate_c=c, samples_to_target_rate_model=c * args.model_n / args.target**2)
        model["cpu_s_to_target_rate_model"] = c * args.model_n / args.target**2 / args.batch * step50
    print(f"MODEL (extrapolated, not measured), N = {args.model_n}: {json.dumps(model)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), curves=res, model=model), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
