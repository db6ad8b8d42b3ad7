"""The distributed half of compare_trees.py: LOOM and minibatch OT on 2 gloo ranks of one source tree, one
digest per case and rank (every scope x table kind x labels, a sharded save loaded as replicated, minibatch OT
in every scope; LOOM, minibatch OT and Sinkhorn with cond and return_indices in every scope; the sharded
semidiscrete coupling's fit, draws and save). Run it once per tree and compare the printed JSON:

    PYTHONPATH=src python tools/compare_trees_gloo.py > new.json
    PYTHONPATH=<old checkout>/src python tools/compare_trees_gloo.py > old.json && cmp new.json old.json
"""

import datetime
import hashlib
import json
import os
import tempfile

import torch
import torch.multiprocessing as mp


def dig(ts):
    h = hashlib.sha1()
    for t in ts:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def body(rank, world, store, outdir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    from loom_kernels.couplings import LoomCoupling, MinibatchOTCoupling, SinkhornCoupling

    N, D, B = 96, 5, 12
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    lab = torch.randint(3, (N,), generator=g)
    res = {}
    for scope in ("global", "local", "grouped"):
        for table in ("replicated", "sharded"):
            for use_lab in (False, True):
                c = LoomCoupling(N, (D,), num_caches=3, seed=4, scope=scope, table=table, group_size=7)
                outs = []
                for s in range(5):
                    perm = torch.randperm(N, generator=torch.Generator().manual_seed(s))[: world * B]
                    idx = perm[rank * B : (rank + 1) * B]
                    kw = {"labels": lab[idx]} if use_lab else {}
                    outs += [c(x[idx], idx, **kw)[0], c.stats["post_cost"], c.stats["swaps"]]
                c.resample(torch.tensor([1, 50, 95]))
                outs.append(c.seeds.clone())
                key = f"loom/{scope}/{table}/{int(use_lab)}"
                if table == "sharded" and not use_lab:
                    p = os.path.join(outdir, f"{scope}.pt")
                    c.save(p)
                    r = LoomCoupling.load(p, table="replicated", mmap_path=None)
                    outs.append(r.seeds.clone())
                res[key] = dig(outs)
    for scope in ("global", "grouped", "local"):
        c = MinibatchOTCoupling(scope=scope, group_size=5, seed=3, generator=torch.Generator().manual_seed(rank))
        outs = []
        for s in range(3):
            xb = x[(rank * B + s) : (rank * B + s + B)]
            outs += [c(xb, labels=lab[:B] if s == 1 else None)[0], c.stats["post_cost"]]
        res[f"mb/{scope}"] = dig(outs)
    cond = torch.randn(N, 2, generator=torch.Generator().manual_seed(9))
    for scope in ("global", "grouped", "local"):  # cond and the permutation, every coupling
        c = LoomCoupling(N, (D,), num_caches=2, seed=5, scope=scope, group_size=7, cond_weight=0.5)
        m = MinibatchOTCoupling(scope=scope, group_size=5, seed=3, cond_weight=0.5)
        k = SinkhornCoupling(0.05, scope=scope, group_size=9, generator=torch.Generator().manual_seed(rank))
        outs = []
        for s in range(3):
            perm = torch.randperm(N, generator=torch.Generator().manual_seed(10 + s))[: world * B]
            idx = perm[rank * B : (rank + 1) * B]
            outs += list(c(x[idx], idx, cond=cond[idx], return_indices=True)) + [c.stats["post_cost"]]
            x0 = torch.randn(B, D, generator=torch.Generator().manual_seed(100 * rank + s))
            outs += list(m(x[idx], x0=x0, cond=cond[idx], return_indices=True)) + [m.stats["post_cost"]]
            kw = {"labels": lab[idx]} if s == 1 else {"cond": cond[idx]}
            outs += list(k(x[idx], x0=x0, return_indices=True, **kw))
            outs += [k.stats[n] for n in ("pre_cost", "post_cost", "swaps", "error", "sharpness")]
        res[f"cond-perm/{scope}"] = dig(outs)
    res["semidiscrete-sharded"] = semidiscrete_case(rank, world, x, lab, outdir)
    with open(os.path.join(outdir, f"r{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def semidiscrete_case(rank, world, x, lab, outdir):
    """The semidiscrete coupling on its rank's block of rows: a fit, labelled draws and their noise, a save."""
    try:
        from loom_kernels.couplings import ShardedSemidiscreteCoupling
    except ImportError:  # a tree from before issue 32's sharded coupling
        return "absent"
    n = len(x)
    lo, hi = rank * n // world, (rank + 1) * n // world
    sd = ShardedSemidiscreteCoupling(x[lo:hi].clone(), num_points=n, labels=lab, seed=6)
    sd.fit(12, batch_size=16, progress=False, window=4)
    outs = [sd.g, sd.fit_state["g_iter"]]
    for s in range(3):
        idx = sd.draw(4, labels=lab[s * 8 + rank * 4 : s * 8 + rank * 4 + 4] if s == 1 else None)
        outs += [idx, sd(x[idx], idx)[0]]
    sd.save(os.path.join(outdir, "sd.pt"))
    return dig(outs)


if __name__ == "__main__":
    d = tempfile.mkdtemp()
    mp.spawn(body, args=(2, os.path.join(d, "store"), d), nprocs=2)
    r = [json.load(open(os.path.join(d, f"r{k}.json"))) for k in range(2)]
    print(json.dumps(r, sort_keys=True))
