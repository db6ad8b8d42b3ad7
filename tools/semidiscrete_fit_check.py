"""The study's semidiscrete potentials as the study fits them (the factory's defaults), and their cell masses
measured on fresh noise: steps run, why the fit stopped, its last check, and ``mass_deviation`` on 65,536 noises.

    PYTHONPATH=src python tools/semidiscrete_fit_check.py --data 8gaussians moons checkerboard digits --seeds 3
"""

from __future__ import annotations

import argparse
import time

import torch

from loom_kernels import data as data_mod
from loom_kernels.couplings.factory import make_coupling
from loom_kernels.couplings.semidiscrete_fit import mass_deviation
from loom_kernels.experiments.variants import DEFAULTS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", default=["8gaussians", "moons", "checkerboard", "digits"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--samples", type=int, default=65_536)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for d in args.data:
        n = DEFAULTS["digits" if d == "digits" else "2d"]["n"]  # the study's preset
        for seed in range(args.seeds):
            x = data_mod.load(d, "train", n=n, seed=seed)
            c0, w0 = time.process_time(), time.perf_counter()
            sd = make_coupling("semidiscrete", len(x), tuple(x.shape[1:]), seed=seed, data=x,
                               options={"progress": False})  # fmt: skip
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            rep, chk = sd.fit_report, mass_deviation(sd, args.samples)
            last = rep.get("check") or {}
            print(
                f"{d:<12} seed {seed}: N = {len(x)}, {sd.fit_steps} steps, stopped: {rep['stopped']}, "
                f"last check {last.get('mass_dev', float('nan')):.3f} on {last.get('samples', 0)} noises; "
                f"mass_deviation on {args.samples}: {chk['mass_dev']:.3f} (floor {chk['mass_dev_floor']:.3f}); "
                f"fit {cpu:.1f} CPU s, {wall:.1f} s wall",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
