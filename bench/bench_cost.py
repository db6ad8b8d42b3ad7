"""pairwise_cost against torch.cdist, the written-out norms + baddbmm formula, the broadcast
formula of the LOOM reference code, and (GPU) a bare torch.bmm of the same shapes.

    python -m pytest bench/bench_cost.py --benchmark-columns=median,iqr,rounds
"""

import pytest
import torch

from loom_kernels.cost import pairwise_cost


def _problem(b, n, m, d, dtype=torch.float32, device="cpu"):
    """One factory for every provider: data-like x1 and standard-normal x0, features last."""
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (b, n, d) if b else (n, d)
    x = torch.randn(shape, generator=g).tanh().to(device=device, dtype=dtype)
    y = torch.randn((b, m, d) if b else (m, d), generator=g).to(device=device, dtype=dtype)
    return x, y


def _norms_baddbmm(x, y):
    x = x.float()
    y = y.float()
    if x.ndim == 2:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    xx = (x * x).sum(-1)
    yy = (y * y).sum(-1)
    return torch.baddbmm(xx.unsqueeze(-1) + yy.unsqueeze(-2), x, y.transpose(-1, -2), alpha=-2.0).clamp_min_(0)


def _broadcast(x, y):
    return ((x.float()[:, None] - y.float()[None]) ** 2).sum(-1)


CPU_PROVIDERS = {
    "loom.pairwise_cost": lambda x, y: pairwise_cost(x, y),
    "torch.cdist**2": lambda x, y: torch.cdist(x, y).square_(),
    "norms+baddbmm": _norms_baddbmm,
    "broadcast (reference code)": _broadcast,
}


@pytest.mark.parametrize("provider", list(CPU_PROVIDERS))
def test_cost_cpu_b256_d3072(benchmark, provider):
    """The coupling's per-step cost: b=256 CIFAR-shaped items (D=3072), float32, sqeuclidean."""
    x, y = _problem(0, 256, 256, 3072)
    fn = CPU_PROVIDERS[provider]
    benchmark.group = "cost cpu 256x256 D=3072 f32"
    out = benchmark(fn, x, y)
    torch.testing.assert_close(out.reshape(256, 256), pairwise_cost(x, y), rtol=1e-4, atol=1e-2)


# ---- GPU ----------------------------------------------------------------------------------------


def _cuda_timed(benchmark, fn, *args):
    def run():
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    for _ in range(3):  # compile / autotune / cuBLAS heuristics before timing
        run()
    return benchmark(run)


GPU_PROVIDERS = {
    "loom.pairwise_cost": lambda x, y: pairwise_cost(x, y),
    "loom.pairwise_cost(tf32)": lambda x, y: pairwise_cost(x, y, allow_tf32=True),
    "torch.bmm (product only)": lambda x, y: torch.bmm(x, y.transpose(1, 2)),
    "torch.cdist": lambda x, y: torch.cdist(x, y),
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("provider", list(GPU_PROVIDERS))
def test_cost_gpu_b64_n256_d3072(benchmark, provider, dtype):
    """B=64 problems of 256x256 in D=3072: the shape of a global batch split into minibatches."""
    if provider.endswith("(tf32)") and dtype != torch.float32:
        pytest.skip("tf32 concerns float32 inputs only")
    B, N, D = 64, 256, 3072
    x, y = _problem(B, N, N, D, dtype=dtype, device="cuda")
    fn = GPU_PROVIDERS[provider]
    if provider == "torch.cdist" and dtype == torch.bfloat16:
        try:
            fn(x, y)
        except RuntimeError:  # cdist has no bf16 kernel in some versions: time its float32 run
            fn = lambda a, b: torch.cdist(a.float(), b.float())  # noqa: E731
    benchmark.group = f"cost gpu B=64 256x256 D=3072 {str(dtype).split('.')[-1]}"
    _cuda_timed(benchmark, fn, x, y)
    sec = benchmark.stats.stats.median
    benchmark.extra_info["TFLOPs"] = round(2 * B * N * N * D / sec / 1e12, 1)
