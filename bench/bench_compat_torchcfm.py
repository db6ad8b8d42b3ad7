"""TorchCFM's ``OTPlanSampler("exact").sample_plan`` against ours (loom_kernels.compat.torchcfm), same run.

Both sides build the same plan (POT's exact plan on continuous data); ``replace=True`` draws the pairs
with the same numpy call, ``replace=False`` is TorchCFM's random-order draw of the whole plan against
our exact permutation. TorchCFM's ``emd`` runs with its default ``num_threads=1``; run this module
with ``OMP_NUM_THREADS=1`` so our cost GEMM gets one thread too (the module also sets torch's).

Run: ``OMP_NUM_THREADS=1 python -m pytest bench/bench_compat_torchcfm.py --benchmark-columns=median,iqr,rounds``
"""

import numpy as np
import pytest
import torch

from loom_kernels.compat import torchcfm as ours


def _problem(b, d):
    """Gaussian noise and a data-like batch (low-rank structure plus noise), shared by both providers."""
    g = torch.Generator().manual_seed(b + d)
    basis = torch.randn(min(d, 32), d, generator=g) / min(d, 32) ** 0.5
    x1 = torch.tanh(torch.randn(b, min(d, 32), generator=g) @ basis + 0.1 * torch.randn(b, d, generator=g))
    return torch.randn(b, d, generator=g), x1


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("d", [2, 3072])
@pytest.mark.parametrize("b", [128, 256, 512])
@pytest.mark.parametrize("provider", ["loom", "torchcfm"])
def test_sample_plan_cpu(benchmark, provider, b, d, replace):
    torch.set_num_threads(1)
    if provider == "torchcfm":
        sampler = pytest.importorskip("torchcfm.optimal_transport").OTPlanSampler("exact")
    else:
        sampler = ours.OTPlanSampler("exact")
    x0, x1 = _problem(b, d)
    benchmark.group = f"sample_plan exact cpu b={b} D={d} replace={replace}"
    benchmark.extra_info.update(provider=provider, threads=1)
    np.random.seed(0)
    out0, out1 = benchmark(sampler.sample_plan, x0, x1, replace=replace)
    assert out0.shape == x0.shape and out1.shape == x1.shape


@pytest.mark.cuda
@pytest.mark.parametrize("b", [256, 1024])
@pytest.mark.parametrize("provider", ["loom", "torchcfm"])
def test_sample_plan_cuda(benchmark, provider, b):
    """CUDA tensors, D=3072, ``replace=False``: ours stays on the GPU; TorchCFM copies the cost to numpy
    for POT (skipped where torchcfm is not installed, as on an offline GPU machine)."""
    if provider == "torchcfm":
        sampler = pytest.importorskip("torchcfm.optimal_transport").OTPlanSampler("exact")
    else:
        sampler = ours.OTPlanSampler("exact")
    x0, x1 = (t.cuda() for t in _problem(b, 3072))
    benchmark.group = f"sample_plan exact cuda b={b} D=3072 replace=False"
    benchmark.extra_info.update(provider=provider)
    np.random.seed(0)

    def call():
        out = sampler.sample_plan(x0, x1, replace=False)
        torch.cuda.synchronize()
        return out

    call()
    out0, out1 = benchmark(call)
    assert out0.shape == x0.shape and out0.device == x0.device
