"""Times the same user-facing calls on two source trees in one run, and checks they give the same results.

For refactors: each tree (a directory that holds the ``loom_kernels`` package with its compiled
modules, e.g. ``src`` of this checkout and an old checkout built in place) gets its own worker process;
the workers take turns call by call (rotating which goes first), so load on a shared machine hits both
alike. Every case prints the median per tree, the ratio and whether the outputs are bit-identical.

Run: ``OMP_NUM_THREADS=1 python tools/compare_trees.py --tree new=src --tree old=/path/old --rounds 15``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# One JSON request per line on stdin: {"case": name, "iters": k}; one JSON reply: seconds per call and
# a digest of the output. The cases build their inputs from fixed seeds, so both trees see the same data.
WORKER = r'''
import hashlib, json, sys, time
import numpy as np, torch
torch.set_num_threads(1)

def digest(x):
    if isinstance(x, (tuple, list)):
        return "".join(digest(t) for t in x)
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:12]

def data(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)

def case_loom_step():
    from loom_kernels.couplings import LoomCoupling
    n, shape = 1024, (3, 32, 32)
    c = LoomCoupling(n, shape, num_caches=6, seed=0, metric="euclidean")
    x = torch.tanh(data(n, 3072, 1)).reshape(n, *shape)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    k = [0]
    def run():
        idx = order[(k[0] % 4) * 256:(k[0] % 4 + 1) * 256]
        k[0] += 1
        return c(x[idx], idx)[0]
    return run

def case_minibatch_ot():
    from loom_kernels.couplings import MinibatchOTCoupling
    x1, x0 = torch.tanh(data(256, 3072, 3)), data(256, 3072, 4)
    c = MinibatchOTCoupling()
    return lambda: c(x1, x0=x0)[0]  # x0 by keyword: accepted before and after it became keyword-only

def loom_run(steps=4, n=512, d=16, b=128, **kw):
    """A fresh coupling, ``steps`` calls: every call's noise and the final table (deterministic per call)."""
    from loom_kernels.couplings import LoomCoupling
    x = torch.tanh(data(n, d, 11))
    labels = kw.pop("labels", None)
    c = LoomCoupling(n, (d,), seed=3, **kw)
    outs = []
    for s in range(steps):
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(20 + s))[:b]
        extra = {} if labels is None else {"labels": labels[idx]}
        outs.append(c(x[idx], idx, **extra)[0])
    outs.append(c.seeds.clone())
    if c.mmap_path:
        c.close()
    return outs

def case_loom_caches_labels():
    labels = torch.randint(4, (512,), generator=torch.Generator().manual_seed(12))
    return lambda: loom_run(num_caches=3, labels=labels, metric="euclidean")

def case_loom_grouped():
    return lambda: loom_run(num_caches=2, scope="grouped", group_size=48)

def case_loom_sharded():
    return lambda: loom_run(num_caches=2, table="sharded")

def case_loom_local():
    return lambda: loom_run(num_caches=2, scope="local")

def case_loom_mmap():
    import tempfile
    d = tempfile.mkdtemp()
    return lambda: loom_run(num_caches=2, mmap_path=f"{d}/table.npy", overwrite=True)

def case_loom_resample_save_load():
    import os
    import tempfile
    from loom_kernels.couplings import LoomCoupling
    d = tempfile.mkdtemp()
    x = torch.tanh(data(300, 8, 13))
    def run():
        c = LoomCoupling(300, (8,), num_caches=2, seed=5)
        c(x[:100], torch.arange(100))
        c.resample(torch.tensor([3, 150, 299]))
        c.save(os.path.join(d, "c.pt"))
        r = LoomCoupling.load(os.path.join(d, "c.pt"))
        r.resample()
        return [r(x[100:200], torch.arange(100, 200))[0], r.seeds.clone(), r.state_dict()["generator"]]
    return run

def case_minibatch_labels_rect():
    from loom_kernels.couplings import MinibatchOTCoupling
    x1, x0 = torch.tanh(data(200, 32, 14)), data(200, 32, 15)
    labels = torch.randint(3, (200,), generator=torch.Generator().manual_seed(16))
    c = MinibatchOTCoupling(metric="euclidean")
    return lambda: [c(x1, x0=x0, labels=labels)[0], c(x1[:150], x0=x0)[0], c.stats["post_cost"]]

def case_minibatch_grouped():
    from loom_kernels.couplings import MinibatchOTCoupling
    x1, x0 = torch.tanh(data(200, 32, 17)), data(200, 32, 18)
    def run():
        c = MinibatchOTCoupling(scope="grouped", group_size=64, seed=2)
        return [c(x1, x0=x0)[0], c(x1, x0=x0)[0], c.stats["pre_cost"]]
    return run

def case_independent():
    from loom_kernels.couplings import IndependentCoupling
    x1 = data(256, 64, 19)
    return lambda: [IndependentCoupling(generator=torch.Generator().manual_seed(1))(x1)[0]]

def case_loom_cond_perm():
    from loom_kernels.couplings import LoomCoupling
    x, cond = torch.tanh(data(256, 8, 30)), data(256, 2, 31)
    def run():
        outs = []
        for scope in ("global", "grouped"):
            c = LoomCoupling(256, (8,), num_caches=2, seed=6, scope=scope, group_size=40, cond_weight=0.5)
            for s in range(3):
                idx = torch.randperm(256, generator=torch.Generator().manual_seed(40 + s))[:96]
                outs += list(c(x[idx], idx, cond=cond[idx], return_indices=True)) + [c.stats["post_cost"]]
            outs.append(c.seeds.clone())
        return outs
    return run

def case_minibatch_cond_perm():
    from loom_kernels.couplings import MinibatchOTCoupling
    x1, x0, cond = torch.tanh(data(160, 16, 32)), data(160, 16, 33), data(160, 3, 34)
    def run():
        outs = []
        for scope in ("global", "local", "grouped"):
            c = MinibatchOTCoupling(scope=scope, group_size=50, seed=1, cond_weight=2.0)
            outs += list(c(x1, x0=x0, cond=cond, return_indices=True)) + [c.stats["post_cost"]]
        return outs
    return run

def case_sinkhorn():
    from loom_kernels.couplings import SinkhornCoupling
    x1, x0 = torch.tanh(data(300, 8, 35)), data(300, 8, 36)
    cond, labels = data(300, 2, 37), torch.randint(3, (300,), generator=torch.Generator().manual_seed(38))
    def run():
        outs = []
        for scope in ("global", "local", "grouped"):
            for kw in ({}, {"labels": labels}, {"cond": cond}):
                c = SinkhornCoupling(0.05, generator=torch.Generator().manual_seed(9), scope=scope, group_size=70)
                outs += list(c(x1, x0=x0, return_indices=True, **kw))
                outs += [c.stats[k] for k in ("pre_cost", "post_cost", "swaps", "error", "sharpness")]
                outs.append(c(x1)[0])  # noise drawn from the generator, argmax off
        c = SinkhornCoupling(0.01, relative=False, argmax=True, generator=torch.Generator().manual_seed(3))
        outs += list(c(x1, x0=x0, labels=labels, cond=cond, return_indices=True))
        return outs
    return run

def case_fixed():
    from loom_kernels.couplings import FixedNoiseCoupling, LoomCoupling
    x = torch.tanh(data(200, 6, 39))
    def run():
        c = FixedNoiseCoupling(LoomCoupling(200, (6,), seed=2))
        idx = torch.randperm(200, generator=torch.Generator().manual_seed(5))[:64]
        return [c(x[idx], idx)[0], c.stats["post_cost"]]
    return run

def case_factory():
    from loom_kernels.couplings.factory import make_coupling
    x = torch.tanh(data(120, 4, 41))
    def run():
        outs = []
        for name in ("independent", "ot", "loom", "fixed"):
            torch.manual_seed(7)
            c = make_coupling(name, 120, (4,), num_caches=2, seed=1)
            outs.append(c(x[:40], torch.arange(40))[0])
        return outs
    return run

def case_assign():
    from loom_kernels.assign import assign
    from loom_kernels.cost import pairwise_cost
    a, b = data(64 * 256, 64, 5).reshape(64, 256, 64), data(64 * 256, 64, 6).reshape(64, 256, 64)
    cost = torch.stack([pairwise_cost(a[i], b[i]) for i in range(64)])
    return lambda: assign(cost)

def case_cost():
    from loom_kernels.cost import pairwise_cost
    x, y = data(256, 3072, 7), data(256, 3072, 8)
    return lambda: pairwise_cost(x, y)

def case_noise():
    from loom_kernels.noise import gaussian_noise
    seeds = torch.arange(256) * 7919
    return lambda: gaussian_noise(seeds, (3072,))

def case_sample():
    from loom_kernels.sampler import sample
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 256), torch.nn.SiLU(), torch.nn.Linear(256, 256), torch.nn.SiLU(),
                              torch.nn.Linear(256, 2))
    model = lambda x, t: net(torch.cat([x, t[:, None]], 1))
    x0 = data(4096, 2, 9)
    return lambda: sample(model, x0, 8, method="midpoint")

def _mlp(d_in, d_out, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, 64), torch.nn.SiLU(), torch.nn.Linear(64, d_out))

def case_sample_guided():
    from loom_kernels.sampler import sample
    net, emb = _mlp(4, 2, 10), torch.nn.Embedding(4, 1)
    class Guided(torch.nn.Module):  # TorchCFM's convention forward(t, x, y), labels and guidance
        null_label, num_classes = 3, 3
        def __init__(self):
            super().__init__()
            self.net, self.emb = net, emb
        def forward(self, t, x, y):
            return self.net(torch.cat([x, t[:, None], self.emb(y)], 1))
    model, x0 = Guided(), data(2048, 2, 11)
    y = torch.arange(2048) % 3
    return lambda: sample(model, x0, 8, method="heun", model_kwargs={"y": y}, guidance=2.0, signature="torchcfm",
                          return_trajectory=True)

def case_sample_dopri5():
    from loom_kernels.sampler import sample
    net = _mlp(3, 2, 12)
    x0 = data(1024, 2, 13).double()
    net = net.double()
    return lambda: sample(lambda x, t: net(torch.cat([x, t[:, None]], 1)), x0, method="dopri5", rtol=1e-6, atol=1e-6)

def case_straightness():
    from loom_kernels.metrics import straightness
    net = _mlp(3, 2, 14)
    x0 = data(2048, 2, 15)
    return lambda: torch.tensor(straightness(lambda x, t: net(torch.cat([x, t[:, None]], 1)), x0, 8, method="midpoint"))

def case_train():
    from loom_kernels import data as data_mod
    from loom_kernels.coupling import LoomCoupling
    from loom_kernels.models import MLPVelocity
    from loom_kernels.train import TrainConfig, train
    ds = data_mod.IndexedDataset(data_mod.load("8gaussians", n=512, seed=0))
    def run():
        torch.manual_seed(0)
        model = MLPVelocity((2,), hidden=64, depth=2)
        res = train(model, ds, LoomCoupling(512, (2,), num_caches=2, seed=0),
                    TrainConfig(steps=30, batch_size=64, lr=3e-3, warmup=5, progress=False, log_every=1, seed=1))
        losses = torch.tensor([h["loss"] for h in res.history] + [h["post_cost"] for h in res.history])
        return [losses] + [p.detach() for p in res.ema.state_dict().values()]
    return run

CASES = {k[5:]: v for k, v in dict(globals()).items() if k.startswith("case_")}
built = {}
for line in sys.stdin:
    req = json.loads(line)
    if req["case"] not in built:
        built[req["case"]] = CASES[req["case"]]()
    fn = built[req["case"]]
    out = fn()
    t = time.perf_counter()
    for _ in range(req["iters"]):
        out = fn()
    dt = (time.perf_counter() - t) / req["iters"]
    print(json.dumps({"s": dt, "digest": digest(out)}), flush=True)
'''
CASES = (
    "loom_step",
    "minibatch_ot",
    "assign",
    "cost",
    "noise",
    "sample",
    "sample_guided",
    "sample_dopri5",
    "straightness",
    "train",
)
# couplings: a fresh coupling per call (deterministic outputs and tables), every scope and table kind at W=1
COUPLING_CASES = (
    "loom_caches_labels",
    "loom_grouped",
    "loom_sharded",
    "loom_local",
    "loom_mmap",
    "loom_resample_save_load",
    "minibatch_labels_rect",
    "minibatch_grouped",
    "independent",
    "loom_cond_perm",
    "minibatch_cond_perm",
    "sinkhorn",
    "fixed",
    "factory",
)
# The LOOM step changes its table each call: its digest is compared on the first call only.
STATEFUL = {"loom_step"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--tree",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a directory holding the loom_kernels package (give two)",
    )
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=3, help="calls per timed turn")
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES + COUPLING_CASES)
    args = p.parse_args(argv)
    trees = dict(t.split("=", 1) for t in args.tree)
    workers = {}
    for name, path in trees.items():
        env = dict(os.environ, PYTHONPATH=os.path.abspath(path), OMP_NUM_THREADS="1")
        workers[name] = subprocess.Popen(
            [sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd="/"
        )

    def ask(name, case, iters):
        w = workers[name]
        w.stdin.write(json.dumps({"case": case, "iters": iters}) + "\n")
        w.stdin.flush()
        line = w.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker for tree {name!r} died on case {case!r}")
        return json.loads(line)

    names = list(trees)
    print(f"{'case':<24}" + "".join(f"{n + ' ms':>12}" for n in names) + f"{'ratio':>8}  same output")
    for case in args.cases:
        first = {n: ask(n, case, 1)["digest"] for n in names}  # warm-up, and the first outputs
        times = {n: [] for n in names}
        digests = {n: set() for n in names}
        for r in range(args.rounds):
            for n in names if r % 2 == 0 else names[::-1]:
                rep = ask(n, case, args.iters)
                times[n].append(rep["s"])
                digests[n].add(rep["digest"])
        med = {n: statistics.median(times[n]) * 1e3 for n in names}
        later_same = case in STATEFUL or len({frozenset(d) for d in digests.values()}) == 1
        same = len(set(first.values())) == 1 and later_same
        print(
            f"{case:<24}"
            + "".join(f"{med[n]:>12.3f}" for n in names)
            + f"{med[names[0]] / med[names[1]]:>8.2f}  {'yes' if same else 'NO'}"
        )
    for w in workers.values():
        w.stdin.close()
        w.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
