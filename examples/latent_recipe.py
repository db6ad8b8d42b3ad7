"""Latent flow matching: couple a frozen encoder's latents, held with each item's dataset index.

Fine-tuning scripts encode the data set once with a frozen VAE/encoder and train on the cached
latents; LOOM-CFM needs only each latent's index (its row in the seed table) beside it. The
noise lives in latent space (``shape`` = the latent's shape); decode the sampled latents at the
end.   python examples/latent_recipe.py [--tiny]
"""

import argparse

import torch
from torch import nn
from tqdm.auto import trange

from loom_kernels.couplings import LoomCoupling
from loom_kernels.sampler import sample


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a few steps (CI)")
    args = p.parse_args(argv)
    tiny, full = (64, (1, 8, 8), (4, 2, 2), 16, 10), (4096, (3, 32, 32), (4, 8, 8), 128, 2000)
    n, img, lat, batch, steps = tiny if args.tiny else full
    torch.manual_seed(0)
    images = torch.rand(n, *img)

    # A frozen encoder/decoder pair (a pretrained VAE in practice): no gradients, eval mode.
    down = img[1] // lat[1]
    encoder = nn.Sequential(nn.Conv2d(img[0], lat[0], down, stride=down), nn.Tanh()).eval().requires_grad_(False)
    decoder = nn.ConvTranspose2d(lat[0], img[0], down, stride=down).eval().requires_grad_(False)
    with torch.no_grad():  # encode once; keep (index, latent) pairs, as a cached-latents dataset does
        latents = torch.cat([encoder(images[i : i + 256]) for i in range(0, n, 256)])
    scale = latents.std()  # latents scaled to unit variance, like a VAE's scaling factor
    latents = latents / scale
    indices = torch.arange(n)
    assert latents.shape[1:] == lat

    model = nn.Sequential(
        nn.Flatten(), nn.Linear(latents[0].numel() + 1, 256), nn.SiLU(), nn.Linear(256, latents[0].numel())
    )
    velocity = lambda x, t: model[1:](torch.cat([x.flatten(1), t[:, None]], 1)).view_as(x)  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    coupling = LoomCoupling(n, lat, num_caches=2)  # one noise seed per latent, in latent space
    for _ in trange(steps, desc="training", disable=None):  # a bar on a terminal (tqdm: the [torch] extra)
        pick = torch.randperm(n)[:batch]
        x0, x1 = coupling(latents[pick], indices[pick])  # the cached latents and their indices
        t = torch.rand(batch)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * x1
        loss = ((velocity(xt, t) - (x1 - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"final loss {loss.item():.4f}")
    z = sample(velocity, torch.randn(4, *lat), nfe=4)
    with torch.no_grad():
        out = decoder(z * scale)
    print(f"decoded samples {tuple(out.shape)}")
    return out


if __name__ == "__main__":
    main()
