"""Sample quality on images: FD-LeNet (a Frechet distance in the features of a small classifier the
experiment trains on the training split; not FID, which needs Inception on 50k samples), exact pixel
W2 on a subset (our solver), straightness, class coverage and memorisation.

Every number is measured from ``n_eval`` generated images at each column of ``common.COLUMNS`` (Euler
NFE 1/2/4/8, midpoint 2/4/8 and the adaptive dopri5 reference).
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from ..._io import atomic_write


class LeNet(nn.Module):
    """Two conv + pool stages and two linear layers; ``features`` is the 64-d penultimate layer."""

    def __init__(self, shape, classes: int = 10):
        super().__init__()
        c, h, w = shape
        self.body = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), 64), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(64, classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def classifier(x, y, path: str, *, steps: int, seed: int = 0) -> tuple[LeNet, dict]:
    """The LeNet for FD-LeNet and coverage: loaded from ``path`` when trained before, else trained on
    ``(x, y)`` (``steps`` Adam steps at batch 128) and saved atomically. Returns (net, info)."""
    classes = int(y.max()) + 1
    net = LeNet(tuple(x.shape[1:]), classes)
    if os.path.exists(path):
        ck = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(ck["state"])
        return net.eval(), {"seconds": 0.0, "steps": int(ck["steps"]), "loaded": True}
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(x), (128,), generator=g)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda f: torch.save({"state": net.state_dict(), "steps": steps}, f))
    return net.eval(), {"seconds": time.perf_counter() - t0, "steps": steps, "loaded": False}


@torch.no_grad()
def features(net: LeNet, x: torch.Tensor, chunk: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(64-d features, predicted classes) of ``x`` in chunks."""
    f = torch.cat([net.features(x[i : i + chunk].clamp(-1, 1)) for i in range(0, len(x), chunk)])
    return f, net.head(f).argmax(1)


def accuracy(net: LeNet, x, y) -> float:
    return float((features(net, x)[1] == y).double().mean())


def coverage(pred: torch.Tensor, classes: int) -> dict:
    """Class shares of the samples: the smallest share x classes (1 = uniform) and the classes with
    at least a fifth of their uniform share."""
    share = torch.bincount(pred, minlength=classes).double() / max(1, len(pred))
    return {"min_share_x_classes": float(share.min() * classes), "classes_covered": int((share >= 0.2 / classes).sum())}


def nearest_distance(x: torch.Tensor, ref: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Each row of ``x``'s Euclidean distance to its nearest row of ``ref`` (pixels)."""
    from ...cost import pairwise_cost

    r = ref.flatten(1)
    out = [pairwise_cost(x[i : i + chunk].flatten(1), r).min(1).values for i in range(0, len(x), chunk)]
    return torch.cat(out).clamp_min(0).sqrt()


def generate(model, x0, col: str, y=None, guidance=None, tol: float = 1e-5) -> tuple[torch.Tensor, int]:
    """Samples of column ``col`` ('euler4', 'midpoint8', 'dopri5' at rtol = atol = ``tol``) from ``x0``
    (labels ``y``): (x1, nfe)."""
    from ...sampler import sample

    kw = {} if y is None else {"model_kwargs": {"y": y}, "guidance": guidance}
    if col == "dopri5":
        info = {}
        x1 = sample(model, x0, method="dopri5", rtol=tol, atol=tol, info=info, **kw)
        return x1, info["nfe"]
    method = col.rstrip("0123456789")
    nfe = int(col[len(method) :])
    return sample(model, x0, nfe, method=method, **kw), nfe


def evaluate(model, clf, x_train, x_test, y_test, s: dict, seed: int, *, x0_train=None, cond=None) -> dict:
    """Every metric of one trained model; ``x0_train``: noise it trained on (memorisation), ``cond``:
    ``(labels for the samples, guidance)`` of a class-conditional model."""
    from ...metrics import fid_from_features, straightness, w2
    from ..common import COLUMNS, STRAIGHTNESS_NFE

    n = min(s["n_eval"], len(x_test))
    g = torch.Generator().manual_seed(seed + 12345)
    x0 = torch.randn(n, *x_test.shape[1:], generator=g)
    y, guidance = cond if cond is not None else (None, None)
    f_test, _ = features(clf, x_test)
    n_w2 = min(s["n_w2"], n)
    ref = x_test[torch.randperm(len(x_test), generator=g)[:n_w2]].flatten(1)
    out = {"fd": {}, "w2": {}, "nfe": {}, "coverage": {}, "label_agreement": {}}
    samples = {}
    for col in COLUMNS if s.get("dopri5", True) else COLUMNS[:-1]:
        x1, nfe = generate(model, x0, col, None if y is None else y[:n], guidance, s.get("dopri5_tol", 1e-5))
        f, pred = features(clf, x1)
        out["fd"][col] = fid_from_features(f_test, f)
        out["w2"][col] = w2(x1[:n_w2].flatten(1), ref)
        out["nfe"][col] = nfe
        out["coverage"][col] = coverage(pred, int(clf.head.out_features))
        if y is not None:
            out["label_agreement"][col] = float((pred == y[:n]).double().mean())
        samples[col] = x1[:64]
    if y is None:  # a guided flow is no single velocity field: its straightness is not comparable
        out["straightness"] = straightness(model, x0[:n_w2], STRAIGHTNESS_NFE)
    # memorisation: how close samples come to the training set, from fresh vs from training noise
    m = min(n, s["n_mem"])
    d_fresh = nearest_distance(generate(model, x0[:m], "euler8")[0], x_train)
    out["nn_dist_fresh"] = float(d_fresh.mean())
    out["nn_dist_test"] = float(nearest_distance(x_test[:m], x_train).mean())  # a held-out image's distance
    if x0_train is not None and y is None:
        out["nn_dist_train_noise"] = float(nearest_distance(generate(model, x0_train[:m], "euler8")[0], x_train).mean())
    return out, samples


def floor(clf, x_train, x_test, n: int, n_w2: int, seed: int) -> dict:
    """The data's own distances: FD-LeNet and W2 between training images and held-out images."""
    from ...metrics import fid_from_features, w2

    g = torch.Generator().manual_seed(seed + 999)
    a = x_train[torch.randperm(len(x_train), generator=g)[: min(n, len(x_test))]]
    b = x_test[torch.randperm(len(x_test), generator=g)[:n_w2]]
    return {
        "fd": fid_from_features(features(clf, x_test)[0], features(clf, a)[0]),
        "w2": w2(a[:n_w2].flatten(1), b.flatten(1)),
    }
