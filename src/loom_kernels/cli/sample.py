"""Command line: draw samples from a trained model (``python -m loom_kernels.sample --ckpt DIR/model.pt ...``).

Library code uses ``loom_kernels.sampler.sample``; this module is the command line only and is not
imported by the package. It loads the EMA weights (``model.pt``, or the ``ema`` entry of a
``checkpoint.pt``), integrates from Gaussian noise with exactly ``--nfe`` evaluations and writes a
``.npy`` of shape ``(n, *shape)``, and optionally a PNG (a scatter for 2-D data, a grid for images).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from .._io import atomic_write
from .._optional import require
from ._errors import HelpFormatter, add_debug, entry, option


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loom_kernels.sample",
        description="Sample a model trained by `python -m loom_kernels.train` (or the demo) with a fixed-step "
        "ODE solver and save the samples as .npy (and a PNG with --plot).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="DIR/model.pt (EMA weights) or DIR/checkpoint.pt")
    p.add_argument(
        "--nfe",
        type=int,
        default=None,
        help="model evaluations of a fixed-step method (None: 4; even for midpoint / heun); "
        "dopri5 chooses its own (--rtol, --atol) and reports how many it made",
    )
    p.add_argument("--method", default="euler", choices=("euler", "midpoint", "heun", "dopri5"), help="ODE solver")
    p.add_argument("--rtol", type=float, default=1e-5, help="dopri5 only")
    p.add_argument("--atol", type=float, default=1e-5, help="dopri5 only")
    p.add_argument(
        "--label",
        type=int,
        default=None,
        help="class-conditional models: the class of every sample (None: the classes in turn)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="class-conditional models: classifier-free guidance scale w (1 = plain conditional)",
    )
    p.add_argument("--n", type=int, default=1000, help="number of samples")
    p.add_argument("--batch-size", type=int, default=4096, help="samples per sampler call")
    p.add_argument("--out", default="samples.npy", help="output .npy path")
    p.add_argument("--plot", default=None, help="also write a PNG here (needs matplotlib: the [demo] extra)")
    p.add_argument("--weights", default="ema", choices=("ema", "raw"), help="raw needs checkpoint.pt")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (None: cuda if available)")
    add_debug(p)
    return p


def _plot(path: str, x: np.ndarray, title: str) -> None:
    matplotlib = require("matplotlib", "--plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..visual import image_grid

    if x.ndim == 2 and x.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(x[:, 0], x[:, 1], s=2)
        ax.set_aspect("equal")
    elif x.ndim == 4 and x.shape[1] in (1, 3):
        side = int(min(8, np.floor(np.sqrt(len(x)))))
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(image_grid(torch.from_numpy(x), side, side), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        raise SystemExit(f"--plot handles 2-D points (n, 2) or images (n, C, H, W) with C in (1, 3), got {x.shape}")
    ax.set_title(title, fontsize=9)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def _labels(model, args, start, m, device):
    n_classes = getattr(model, "num_classes", None)
    if n_classes is None:
        if args.label is not None or args.guidance is not None:
            raise SystemExit("--label/--guidance need a class-conditional model; this one has no classes")
        return {}
    if args.label is not None:
        if not 0 <= args.label < n_classes:
            raise SystemExit(f"--label must be in [0, {n_classes - 1}] (the model's classes), got {args.label}")
        y = torch.full((m,), args.label, dtype=torch.long)
    else:
        y = torch.arange(start, start + m) % n_classes
    return {"y": y.to(device)}


def _draw(model, shape, args, device) -> tuple[np.ndarray, list]:
    """The samples and the evaluations each sampler call made (dopri5's differ per call)."""
    from ..sampler import Options, sample

    gen = torch.Generator().manual_seed(args.seed)
    chunks, nfes = [], []
    for start in range(0, args.n, args.batch_size):
        m = min(args.batch_size, args.n - start)
        x0 = torch.randn(m, *shape, generator=gen).to(device)
        info = {}
        chunks.append(
            sample(
                model,
                x0,
                args.nfe,
                method=args.method,
                atol=args.atol,
                rtol=args.rtol,
                model_kwargs=_labels(model, args, start, m, device),
                guidance=args.guidance,
                options=Options(info=info),
            ).cpu()
        )
        nfes.append(info["nfe"])
    return torch.cat(chunks).numpy(), nfes


@entry("python -m loom_kernels.sample")
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .._device import resolve_device
    from ..train import load_model

    if args.n <= 0:
        raise SystemExit(f"--n must be positive, got {args.n}")
    if args.batch_size <= 0:
        raise SystemExit(f"--batch-size must be positive, got {args.batch_size}")
    if args.plot:
        require("matplotlib", "--plot")  # before the sampling, not after it
    if not args.out.endswith(".npy"):
        raise SystemExit(f"--out must end in .npy, got {args.out!r}")
    if args.method == "dopri5" and args.nfe is not None:
        raise SystemExit("--nfe is for the fixed-step methods: dopri5 chooses its own steps (set --rtol/--atol)")
    if args.method != "dopri5":
        args.nfe = 4 if args.nfe is None else args.nfe
        if args.nfe <= 0 or (args.method != "euler" and args.nfe % 2):
            even = "" if args.method == "euler" else f" and even for {args.method}"
            raise SystemExit(f"--nfe must be positive{even}, got {args.nfe}")
    device = resolve_device(args.device, prefer_cuda=True)
    with option("--ckpt", args.ckpt):
        model = load_model(args.ckpt, weights=args.weights, map_location=device).eval()
    shape = tuple(model.spec["shape"]) if hasattr(model, "spec") else None
    if shape is None:
        raise SystemExit(f"{args.ckpt!r}: the model has no spec with its input shape")
    x, nfes = _draw(model, shape, args, device)
    nfe = str(nfes[0]) if min(nfes) == max(nfes) else f"{min(nfes)}-{max(nfes)}"  # per sampler call
    if not np.isfinite(x).all():
        raise SystemExit(
            f"the samples contain NaN or inf ({int((~np.isfinite(x)).sum())} entries): nothing "
            f"written to {args.out}; the model in {args.ckpt!r} is broken (a diverged run?)"
        )
    atomic_write(args.out, lambda f: np.save(f, x))
    print(f"wrote {args.n} samples of shape {shape} ({args.method}, NFE {nfe}) to {args.out}")
    if args.plot:
        _plot(args.plot, x, f"{os.path.basename(args.ckpt)}: {args.method}, NFE {nfe}")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
