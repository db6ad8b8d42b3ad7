"""Reflow on LOOM-CFM: train with LOOM, store the model's pairs as seeds, retrain on them, sample at NFE 1.

LOOM-CFM's models are a good start for distillation (its ``CIFAR10_reflow_1x``): one reflow round
trains a new model on pairs (noise, the model's ODE solution from it), whose paths are straighter, so
one Euler step already lands near the data. The pairs are stored as 8-byte noise seeds + targets.

The same from the command line:
    python -m loom_kernels.train --data moons --coupling loom --out run
    python -m loom_kernels.reflow generate --model run/model.pt --num 4096 --method heun --nfe 16 --out pairs
    python -m loom_kernels.train --coupling reflow --pairs pairs --init-from run/model.pt --out reflow
    python -m loom_kernels.sample --model reflow/model.pt --nfe 1 ...

    python examples/reflow.py [--tiny]
"""

import argparse
import os
import tempfile

import torch

from loom_kernels import data, metrics, models
from loom_kernels.couplings import LoomCoupling
from loom_kernels.couplings.reflow import ReflowCoupling
from loom_kernels.reflow import generate_pairs, pairs_dataset
from loom_kernels.sampler import sample
from loom_kernels.train import TrainConfig, load_model, train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a few steps (CI)")
    p.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    args = p.parse_args(argv)
    n, steps, pairs_n, batch = (256, 30, 256, 64) if args.tiny else (4096, 3000, 4096, 256)
    out = args.out or tempfile.mkdtemp(prefix="loom_reflow_")
    cfg = {"batch_size": batch, "lr": 2e-3, "warmup": 10, "device": "cpu", "progress": False}
    torch.manual_seed(0)
    ds = data.IndexedDataset(data.load("moons", n=n))
    net = models.MLPVelocity((2,), hidden=64, depth=2)

    # 1. LOOM-CFM.
    loom = LoomCoupling(len(ds), ds.shape, num_caches=4, seed=0)
    run = os.path.join(out, "loom")
    train(net, ds, loom, TrainConfig(steps=steps, out_dir=run, **cfg), metadata={"model": net.spec})

    # 2. Pairs: seed + target each, from the EMA weights (resumable: rerun and it continues).
    pairs = os.path.join(out, "pairs")
    generate_pairs(os.path.join(run, "model.pt"), pairs_n, "heun", 16, pairs, device="cpu", progress=False)

    # 3. Reflow: a run on the pairs, started from the LOOM model's weights.
    reflow = os.path.join(out, "reflow")
    train(
        models.MLPVelocity((2,), hidden=64, depth=2),
        pairs_dataset(pairs),
        ReflowCoupling(pairs),
        TrainConfig(steps=steps, out_dir=reflow, init_from=os.path.join(run, "model.pt"), **cfg),
        metadata={"model": net.spec},
    )

    # 4. One Euler step from the same noise.
    x0 = torch.randn(1024, 2, generator=torch.Generator().manual_seed(1))
    real = data.load("moons", n=1024, seed=1)
    for name in ("loom", "reflow"):
        model = load_model(os.path.join(out, name, "model.pt"))
        x1 = sample(model, x0, nfe=1)
        print(f"{name}: W2 to the data at NFE 1 = {metrics.w2(x1, real):.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
