"""Data-parallel training with torchrun: the couplings pair the GLOBAL batch (or groups of it).

Each rank draws its own minibatch; the coupling exchanges what it needs through torch.distributed
(the default process group), so the pairing is that of the whole global batch ("global", exact),
or of random groups of ``group_size`` items solved in parallel by owner ranks ("grouped": cheaper
for large worlds, see docs/scaling.md). LoomCoupling's table stays identical on every rank.

    torchrun --nproc_per_node 2 examples/ddp.py            # gloo on CPU; nccl when on GPUs
    torchrun --nproc_per_node 2 examples/ddp.py --tiny     # what CI runs
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import trange

from loom_kernels.couplings import LoomCoupling, MinibatchOTCoupling


def train(model, opt, coupling, data, batch, steps, rank, world, gen):
    n = len(data)
    for _ in trange(steps, desc=f"rank {rank}", disable=None if rank == 0 else True):  # rank 0 shows a bar
        # The same permutation on every rank (shared generator), each rank takes its slice: no
        # index appears twice in the global batch, as a DistributedSampler guarantees.
        perm = torch.randperm(n, generator=gen)[: batch * world]
        idx = perm[rank * batch : (rank + 1) * batch]
        if isinstance(coupling, LoomCoupling):
            x0, x1 = coupling(data[idx], idx)
        else:
            x0, x1 = coupling(data[idx])
        t = torch.rand(batch, 1)
        xt = (1 - t) * x0 + t * x1
        loss = ((model(torch.cat([xt, t], 1)) - (x1 - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients
        opt.step()
    return loss.item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a few steps (CI)")
    args = p.parse_args(argv)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n, dim, batch, steps = (128, 4, 8, 4) if args.tiny else (20000, 16, 256, 1000)
    torch.manual_seed(0)  # the same data and initial weights on every rank
    data = torch.randn(n, dim) * 0.5 + 2.0
    gen = torch.Generator().manual_seed(1)

    for name, coupling in [
        ("LOOM-CFM, global batch", LoomCoupling(n, dim, num_caches=2, scope="global")),
        ("minibatch OT, global batch", MinibatchOTCoupling(scope="global")),
        ("minibatch OT, groups of 8", MinibatchOTCoupling(scope="grouped", group_size=8)),
    ]:
        model = DDP(nn.Sequential(nn.Linear(dim + 1, 64), nn.SiLU(), nn.Linear(64, dim)))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        torch.manual_seed(100 + rank)  # different t on each rank
        loss = train(model, opt, coupling, data, batch, steps, rank, world, gen)
        if rank == 0:
            print(f"{name}: world {world}, global batch {batch * world}, final loss {loss:.4f}")
    dist.barrier()  # every rank is past its last collective before the group goes away
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without running C++ static destructors: gloo's transport threads can still be joinable at
    # interpreter exit, and std::thread's destructor then aborts the process (SIGABRT, "terminate called
    # without an active exception") after the results are printed. Copy this ending with the example.
    os._exit(0)
