"""Tiny models for the reflow tests (imported by the tests and by the subprocess the kill test starts)."""

import sys
import time

import torch
from torch import nn


class TinyField(nn.Module):
    """A small velocity MLP on (2,) points; ``delay`` seconds of sleep per call (the kill test's pace)."""

    def __init__(self, hidden=16, delay=0.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 2))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.shape, self.delay, self.calls = (2,), delay, 0

    def forward(self, x, t):
        self.calls += x.shape[0]
        if self.delay:
            time.sleep(self.delay)
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], 1))


class TinyConditional(nn.Module):
    """A class-conditional field on (2,) points: ``model(x, t, y=...)``, ``null_label = num_classes``."""

    def __init__(self, num_classes=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(num_classes + 1, 4)
        self.net = nn.Linear(7, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.shape, self.num_classes, self.null_label = (2,), num_classes, num_classes

    def forward(self, x, t, y=None):
        y = torch.full((x.shape[0],), self.null_label) if y is None else y
        return self.net(torch.cat([x, t[:, None].to(x.dtype), self.emb(y).to(x.dtype)], 1))


def euler_reference(model, x0, nfe, **kw):
    """Euler in float64 from x0 (the independent reference for the stored targets)."""
    model = model.double()
    x = x0.double()
    with torch.no_grad():
        for k in range(nfe):
            t = torch.full((x.shape[0],), k / nfe, dtype=torch.float64)
            x = x + model(x, t, **kw) / nfe
    model.float()
    return x


if __name__ == "__main__":  # the kill test: generate slowly into sys.argv[1] until killed
    from loom_kernels.reflow import generate_pairs

    generate_pairs(
        TinyField(delay=0.05), 64, "euler", 2, sys.argv[1], batch_size=4, device="cpu", progress=False, commit_every=0
    )
