"""Class-conditional flow matching with classifier-free guidance.

Training: the coupling gets the labels (``labels=``), so noise is only exchanged between items of
the same class (the pairing then respects the conditioning); labels are dropped to a null class
10% of the time so one network learns both v(x, t, y) and v(x, t). Sampling: ``guidance=w`` mixes
them as v_null + w (v_cond - v_null).   python examples/class_conditional.py [--tiny]
"""

import argparse

import torch
from torch import nn
from tqdm.auto import trange

from loom_kernels.couplings import LoomCoupling
from loom_kernels.sampler import sample


class CondVelocity(nn.Module):
    def __init__(self, dim: int, num_classes: int, width: int = 128):
        super().__init__()
        self.num_classes, self.null_label = num_classes, num_classes  # the extra embedding row = "no class"
        self.embed = nn.Embedding(num_classes + 1, width)
        self.inp = nn.Linear(dim + 1, width)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x, t, y):
        return self.out(self.inp(torch.cat([x, t[:, None]], dim=1)) + self.embed(y))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a few steps (CI)")
    args = p.parse_args(argv)
    n, classes, dim, batch, steps = (96, 3, 2, 24, 12) if args.tiny else (6000, 3, 2, 256, 3000)
    torch.manual_seed(0)
    labels = torch.arange(n) % classes
    centers = torch.tensor([[4.0, 0.0], [-2.0, 3.5], [-2.0, -3.5]])
    data = centers[labels] + 0.3 * torch.randn(n, dim)

    model = CondVelocity(dim, classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    coupling = LoomCoupling(n, dim, num_caches=2)
    for _ in trange(steps, desc="training", disable=None):  # a bar on a terminal (tqdm: the [torch] extra)
        idx = torch.randperm(n)[:batch]
        x0, x1 = coupling(data[idx], idx, labels=labels[idx])  # noise exchanged within each class only
        y = labels[idx].clone()
        y[torch.rand(batch) < 0.1] = model.null_label  # label dropout: the unconditional model
        t = torch.rand(batch)
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        loss = ((model(xt, t, y) - (x1 - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"final loss {loss.item():.4f}")

    want = torch.arange(classes).repeat_interleave(4)
    x = sample(model, torch.randn(len(want), dim), nfe=8, model_kwargs={"y": want}, guidance=2.0)
    for c in range(classes):
        print(f"class {c}: mean of samples {x[want == c].mean(0).tolist()} (center {centers[c].tolist()})")
    return x


if __name__ == "__main__":
    main()
