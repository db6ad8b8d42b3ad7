"""The CPU kernels' instruction-set paths (and other builds of ``_C``) timed call by call, interleaved.

pytest-benchmark times one provider after the other; on a shared machine the load drifts between
them by more than the few percent this comparison is about. Here every round calls each provider
once on the same input, starting one provider later each round (the first call after a scalar
one runs at a higher AVX-512 clock), and the ratio to the first provider is taken per round
(paired), then its median. The solver is called raw (``_C.solve_lap``, one thread) on bench_assign.py's
problems, the noise as bench_noise.py's 256x3072 float32 minibatch (one thread).

    python tools/isa_compare.py --other today=/path/to/old/_C.so --other native=/path/to/native/_C.so

Providers: each ``--other`` build (loaded beside this one), then this build's paths (``_C.isas()``).
"""

import argparse
import importlib.util
import statistics
import time

import numpy as np

from loom_kernels import _native
from loom_kernels.testing import assignment_problem

FAMILIES = ("unif", "sq3072", "sq2")  # bench_assign.py's order: its seeds use the index


def _load_other(name, path):
    # Another build's _C beside this one: a module name of its own (Python keeps one module per
    # name; the last part must stay _C, the name of the .so's init function).
    spec = importlib.util.spec_from_file_location(f"_isa_compare_{name}._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _providers(others, paths):
    this = _native.cpu()
    out = {name: (_load_other(name, path), None) for name, path in others}
    out.update({isa: (this, isa) for isa in reversed(this.isas()) if paths is None or isa in paths})  # best first
    return out


def _cases(sizes, repeat):
    for family in FAMILIES:
        for n in sizes:
            cost = assignment_problem(family, n, rng=np.random.default_rng([FAMILIES.index(family), n, 0]))[None]
            reps = repeat * (10 if n >= 1024 else 40)
            yield f"assign {family} N={n}", (lambda m, c=cost: m.solve_lap(c, False, 1)), reps
    cost = assignment_problem("sq3072", 256, batch=64, rng=np.random.default_rng([1, 256, 64]))
    yield "assign batch sq3072 64x256 (2 threads)", (lambda m: m.solve_lap(cost, False, 2)), repeat * 10
    seeds = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, 256, dtype=np.int64)
    yield "noise 256x3072 f32", (lambda m: m.philox_normal(seeds, 3072, 1)), repeat * 60


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--other", action="append", default=[], metavar="NAME=PATH", help="another build's _C .so")
    ap.add_argument("--sizes", default="64,256,1024", help="assignment sizes N (comma separated)")
    ap.add_argument("--paths", default=None, help="this build's paths to time (comma separated; default: all)")
    ap.add_argument("--repeat", type=int, default=1, help="multiply every case's rounds")
    args = ap.parse_args()
    others = [tuple(o.split("=", 1)) for o in args.other]
    providers = _providers(others, args.paths and args.paths.split(","))
    names = list(providers)
    this = _native.cpu()
    before = this.isa()
    print(f"| case | {names[0]} (ms) | " + " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |")
    print("|---|---|" + "---|" * (len(names) - 1))
    for case, fn, rounds in _cases([int(s) for s in args.sizes.split(",")], args.repeat):
        times = {n: [] for n in names}
        for r in range(len(names) * (rounds // len(names) + 1) + 1):  # round 0 warms up
            for n in names[r % len(names) :] + names[: r % len(names)]:
                mod, isa = providers[n]
                if isa:
                    this.set_isa(isa)
                t0 = time.perf_counter()
                fn(mod)
                times[n].append(time.perf_counter() - t0)
        times = {n: t[1:] for n, t in times.items()}  # the same rounds for every provider: paired
        base = times[names[0]]
        ratios = [statistics.median(b / a for a, b in zip(base, times[n])) for n in names[1:]]
        print(
            f"| {case} | {statistics.median(base) * 1e3:.3g} | " + " | ".join(f"{r:.3f}" for r in ratios) + " |",
            flush=True,
        )
    this.set_isa(before)


if __name__ == "__main__":
    main()
