"""gaussian_noise against the LOOM reference's per-sample generator loop (CPU) and torch.randn
of the same size (GPU, with the write bandwidth of a plain fill_ as the roofline).

    python -m pytest bench/bench_noise.py --benchmark-columns=median,iqr,rounds
"""

import pytest
import torch

from loom_kernels.noise import gaussian_noise

S, SHAPE = 256, (3, 32, 32)  # one CIFAR-shaped minibatch of noise


def _seeds(n=S):
    return torch.randint(-(2**63), 2**63 - 1, (n,), generator=torch.Generator().manual_seed(0))


def _per_sample_loop(seeds, shape):
    # The LOOM reference code's regeneration: one CPU generator per stored seed.
    out = torch.empty((len(seeds), *shape))
    for i, s in enumerate(seeds.tolist()):
        g = torch.Generator().manual_seed(s & (2**63 - 1))  # manual_seed takes non-negative seeds here
        out[i] = torch.randn(shape, generator=g)
    return out


CPU_PROVIDERS = {
    "loom.gaussian_noise": lambda seeds: gaussian_noise(seeds, SHAPE),
    "per-sample Generator loop (reference code)": lambda seeds: _per_sample_loop(seeds, SHAPE),
    "torch.randn (one stream, not per seed)": lambda seeds: torch.randn((len(seeds), *SHAPE)),
}


@pytest.mark.parametrize("provider", list(CPU_PROVIDERS))
def test_noise_cpu_256x3072(benchmark, provider):
    seeds = _seeds()
    benchmark.group = "noise cpu 256x3072 f32"
    out = benchmark(CPU_PROVIDERS[provider], seeds)
    assert out.shape == (S, *SHAPE)


# ---- GPU ----------------------------------------------------------------------------------------


GPU_PROVIDERS = {
    "loom.gaussian_noise": lambda seeds, shape: gaussian_noise(seeds, shape),
    "torch.randn": lambda seeds, shape: torch.randn((len(seeds), *shape), device="cuda"),
    "torch.empty.fill_ (write roofline)": lambda seeds, shape: torch.empty((len(seeds), *shape), device="cuda").fill_(
        1.0
    ),
}


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [256, 16384], ids=["256x3072", "16384x3072"])
@pytest.mark.parametrize("provider", list(GPU_PROVIDERS))
def test_noise_gpu(benchmark, provider, rows):
    seeds = _seeds(rows).cuda()
    fn = GPU_PROVIDERS[provider]

    def run():
        out = fn(seeds, SHAPE)
        torch.cuda.synchronize()
        return out

    for _ in range(3):
        run()
    benchmark.group = f"noise gpu {rows}x3072 f32"
    benchmark(run)
    sec = benchmark.stats.stats.median
    benchmark.extra_info["write_GBps"] = round(rows * 3072 * 4 / sec / 1e9, 1)
