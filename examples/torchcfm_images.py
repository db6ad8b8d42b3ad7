"""TorchCFM-style image training with LOOM-CFM's persistent coupling (LoomConditionalFlowMatcher).

The loop of TorchCFM's CIFAR-10 example with one change: the flow matcher takes the batch's
dataset indices, because LOOM-CFM keeps each image's noise (as a seed) across epochs and keeps
improving the pairing. Run:  python examples/torchcfm_images.py          (CIFAR-shaped random data)
                             python examples/torchcfm_images.py --tiny   (seconds; what CI runs)
Swap in a real dataset that yields (index, image) and a real UNet (torchcfm.models.unet.UNetModel).
"""

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from loom_kernels.compat.torchcfm import LoomConditionalFlowMatcher
from loom_kernels.sampler import sample


class TinyVelocity(nn.Module):
    """A stand-in for a UNet: v(x, t) for images (B, C, H, W)."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )

    def forward(self, x, t):
        return self.net(torch.cat([x, t.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])], dim=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a few steps on 4x4 images (CI)")
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args(argv)
    n, shape, batch, steps = (64, (3, 4, 4), 16, 8) if args.tiny else (5000, (3, 32, 32), 128, args.steps)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    images = torch.rand(n, *shape) * 2 - 1  # your dataset, scaled to [-1, 1]
    loader = DataLoader(TensorDataset(torch.arange(n), images), batch_size=batch, shuffle=True, drop_last=True)
    model = TinyVelocity(shape[0]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4 if not args.tiny else 1e-3)
    # num_points = dataset size: one noise seed per image; num_caches > 1 keeps several candidates.
    fm = LoomConditionalFlowMatcher(n, shape, sigma=0.0, num_caches=2, device=device)

    step = 0
    bar = tqdm(total=steps, desc="training", disable=None)  # a bar on a terminal (tqdm: the [torch] extra)
    while step < steps:
        for idx, x1 in loader:
            x1 = x1.to(device)
            t, xt, ut = fm.sample_location_and_conditional_flow(None, x1, indices=idx)
            loss = ((model(xt, t) - ut) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update()
            if step % max(1, steps // 4) == 0:
                print(f"step {step}: loss {loss.item():.4f}")
            if step == steps:
                break
    bar.close()
    # torch.save({"model": model.state_dict(), "coupling": fm.state_dict()}, "ckpt.pt") to resume.
    x = sample(model, torch.randn(8, *shape, device=device), nfe=4)
    print(f"sampled {tuple(x.shape)}, range [{x.min().item():.2f}, {x.max().item():.2f}]")
    return loss.item()


if __name__ == "__main__":
    main()
