"""A torch.compile'd minibatch-OT step (noise + cost + assignment + pairs) against eager, same run.

The step a training loop makes per batch at b=256, CIFAR shape (D=3072), on the CPU: the three
public calls go through their custom ops (loom_kernels.ops) under compile, so the graph is one
piece; the compiled step must never be slower than eager. The compile time (first call, cold
Dynamo cache) is in extra_info and printed.

Run: ``python -m pytest bench/bench_compile.py --benchmark-columns=median,iqr,rounds``
"""

import time

import pytest
import torch

from loom_kernels.assign import assign
from loom_kernels.cost import pairwise_cost
from loom_kernels.noise import gaussian_noise

B, SHAPE = 256, (3, 32, 32)


def ot_step(x1, seeds):
    x0 = gaussian_noise(seeds, x1.shape[1:])
    col = assign(pairwise_cost(x1.flatten(1), x0.flatten(1)))
    return x0[col]


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, *SHAPE, generator=g), torch.randint(-(2**62), 2**62, (B,), generator=g)


@pytest.fixture(scope="module")
def compiled(batch):
    torch._dynamo.reset()
    fn = torch.compile(ot_step, fullgraph=True)
    t0 = time.perf_counter()
    fn(*batch)
    seconds = time.perf_counter() - t0
    print(f"\ncompile (first call, fullgraph, inductor): {seconds:.1f} s")
    return fn, seconds


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_ot_step(benchmark, batch, compiled, mode):
    fn = ot_step if mode == "eager" else compiled[0]
    benchmark.extra_info["compile_s"] = round(compiled[1], 2)
    out = benchmark(fn, *batch)
    assert torch.equal(out, ot_step(*batch))
