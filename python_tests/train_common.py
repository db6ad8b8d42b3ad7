"""Shared by the trainer's tests (test_train_*.py): a small run, its config, and instrumented couplings/models."""

import torch

from loom_kernels import data
from loom_kernels.couplings import IndependentCoupling
from loom_kernels.models import MLPVelocity, UNet
from loom_kernels.train import TrainConfig, make_coupling


def setup_run(coupling="loom", n=96, caches=2, hidden=16, seed=0):
    torch.manual_seed(seed)
    ds = data.IndexedDataset(data.load("8gaussians", n=n, seed=seed))
    model = MLPVelocity((2,), hidden=hidden, depth=2, time_dim=8)
    return model, ds, make_coupling(coupling, n, (2,), num_caches=caches, seed=seed)


def small_config(**kw):
    base = dict(steps=10, batch_size=16, lr=3e-3, warmup=3, progress=False, log_every=1, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def param_copy(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


class LabelledIndependent(IndependentCoupling):
    """IndependentCoupling that records the labels it gets."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def __call__(self, x1, *, indices=None, labels=None):
        self.seen.append((indices.clone(), None if labels is None else labels.clone(), x1.clone()))
        return super().__call__(x1, indices=indices)


class Recording(UNet):
    def forward(self, x, t, y=None):
        self.ys = getattr(self, "ys", []) + [None if y is None else y.clone()]
        return super().forward(x, t, y)


def digits_set(n=256, flip=False):
    x, y = data.load_labeled("digits", n=n)
    ds = data.LabeledDataset(x, y)
    return data.FlipDataset(ds) if flip else ds


class NaNAfter(IndependentCoupling):
    def __init__(self, after):
        super().__init__()
        self.calls, self.after = 0, after

    def __call__(self, x1, *, indices=None, labels=None):
        self.calls += 1
        x0, x1 = super().__call__(x1, indices=indices)
        return (x0 * float("nan") if self.calls in self.after else x0), x1
