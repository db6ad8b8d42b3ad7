"""One LOOM coupling step: ours (LoomCoupling) against the reference code's path, in the same run.

The reference (``reference_paper.ReferencePaperCoupling``, beside this file) is the LOOM-CFM code's path: per-sample
seed files, per-sample CPU ``torch.Generator`` noise, a broadcast Euclidean cost (b, b, D) and scipy.
Both use the Euclidean metric (the reference code's choice) and the paper's cache counts (CIFAR10: 6
caches; FFHQ-latent 4x32x32: 4). A step is: pick slots, regenerate noise, cost, assignment, write back.

At b=1024 the reference's broadcast would need 12-16 GB; it is skipped there (ours is still timed).

Run: ``python -m pytest bench/bench_coupling.py --benchmark-columns=median,iqr,rounds``
(GPU cases: ``-m cuda``, on a machine with a GPU).
"""

import itertools

import pytest
import torch

from loom_kernels.couplings import LoomCoupling, MinibatchOTCoupling

from reference_paper import ReferencePaperCoupling

SHAPES = {"cifar": ((3, 32, 32), 6), "latent": ((4, 32, 32), 4)}
CPU_THREADS = 2
REFERENCE_MAX_B = 256  # (b, b, D) float32 broadcast: 0.8 GB at b=256 CIFAR, 12.9 GB at b=1024


def _problem(b, shape, device="cpu", batches=4):
    """A data-like batch stream over a dataset of ``batches * b`` points (shared by every provider)."""
    g = torch.Generator().manual_seed(0)
    n = batches * b
    d = int(torch.tensor(shape).prod())
    basis = torch.randn(32, d, generator=g) / 32**0.5
    data = torch.tanh(torch.randn(n, 32, generator=g) @ basis + 0.1 * torch.randn(n, d, generator=g))
    data = data.reshape(n, *shape).to(device)
    perm = torch.randperm(n, generator=g)
    return n, data, [perm[a : a + b] for a in range(0, n, b)]


def _cycle_step(coupling, data, batches, sync=None):
    # Batches are sliced beforehand: the timed step is the coupling alone (indices stay on the host,
    # as a DataLoader yields them).
    it = itertools.cycle([(data[idx.to(data.device)], idx) for idx in batches])

    def step():
        x1, idx = next(it)
        x0, _ = coupling(x1, idx)
        if sync is not None:
            sync()
        return x0

    return step


@pytest.mark.parametrize("b", [128, 256, 1024])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("provider", ["loom-cpu", "reference-paper"])
def test_coupling_step_cpu(benchmark, provider, shape_name, b, tmp_path):
    shape, caches = SHAPES[shape_name]
    torch.set_num_threads(CPU_THREADS)
    n, data, batches = _problem(b, shape)
    benchmark.group = f"coupling step cpu {shape_name} {'x'.join(map(str, shape))} b={b}"
    benchmark.extra_info.update(provider=provider, threads=CPU_THREADS, caches=caches, metric="euclidean")
    if provider == "loom-cpu":
        coupling = LoomCoupling(n, shape, num_caches=caches, metric="euclidean", seed=0)
        x0 = benchmark(_cycle_step(coupling, data, batches))
        assert float(coupling.stats["post_cost"]) <= float(coupling.stats["pre_cost"])
    else:
        if b > REFERENCE_MAX_B:
            pytest.skip(f"the reference's (b, b, D) broadcast needs {b * b * data[0].numel() * 4 / 2**30:.0f} GiB")
        ref = ReferencePaperCoupling(tmp_path / "seeds", n, shape, num_caches=caches, seed=0)
        x0 = benchmark.pedantic(_cycle_step(ref, data, batches), rounds=3, warmup_rounds=1, iterations=1)
    assert x0.shape == (b, *shape)


@pytest.mark.cuda
@pytest.mark.parametrize("b", [256, 1024])
@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
def test_coupling_step_cuda(benchmark, b, metric):
    shape, caches = SHAPES["cifar"]
    n, data, batches = _problem(b, shape, device="cuda")
    coupling = LoomCoupling(n, shape, num_caches=caches, metric=metric, seed=0, device="cuda")
    benchmark.group = f"coupling step cuda cifar 3x32x32 b={b} {metric}"
    benchmark.extra_info.update(provider="loom-cuda", caches=caches, metric=metric, indices="cpu")
    step = _cycle_step(coupling, data, batches, sync=torch.cuda.synchronize)
    for _ in range(3):
        step()  # compile / autotune the kernels outside the timing
    x0 = benchmark(step)
    assert x0.shape == (b, *shape)
    assert float(coupling.stats["post_cost"]) <= float(coupling.stats["pre_cost"])


@pytest.mark.parametrize("classes", [0, 10, 1000])
@pytest.mark.parametrize("d", [2, 3072])
def test_minibatch_ot_labels_cpu(benchmark, d, classes):
    """Class-conditional minibatch OT (one batched solve, cross-class pairs forbidden) vs the unconditional
    solve (``classes=0``) on the same batch and noise, b=256, one thread (a multi-threaded torch op on the
    small b x b cost only adds thread wake-ups, which dominate on a shared machine)."""
    b = 256
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(d)
    x1, x0 = torch.rand(b, d, generator=g), torch.randn(b, d, generator=g)
    labels = torch.randint(classes, (b,), generator=g) if classes else None
    coupling = MinibatchOTCoupling()
    benchmark.group = f"minibatch OT cpu b={b} D={d} labels"
    benchmark.extra_info.update(provider=f"classes={classes}" if classes else "unconditional", threads=1)
    out, _ = benchmark(lambda: coupling(x1, x0=x0, labels=labels))
    assert out.shape == x1.shape


@pytest.mark.cuda
@pytest.mark.parametrize("classes", [0, 10, 1000])
def test_coupling_step_labels_cuda(benchmark, classes):
    """A LOOM step with class labels on the GPU (one batched solve, cross-class pairs forbidden) vs the
    unconditional step (``classes=0``), b=256, CIFAR shape: the labels must not cost extra host syncs."""
    b = 256
    shape, caches = SHAPES["cifar"]
    n, data, batches = _problem(b, shape, device="cuda")
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(max(classes, 1), (n,), generator=g).cuda() if classes else None
    coupling = LoomCoupling(n, shape, num_caches=caches, seed=0, device="cuda")
    benchmark.group = f"coupling step cuda cifar 3x32x32 b={b} labels"
    benchmark.extra_info.update(provider=f"classes={classes}" if classes else "unconditional", caches=caches)
    it = itertools.cycle(batches)

    def step():
        idx = next(it)
        x0, _ = coupling(data[idx.cuda()], idx, labels=None if labels is None else labels[idx.cuda()])
        torch.cuda.synchronize()
        return x0

    for _ in range(3):
        step()
    x0 = benchmark(step)
    assert x0.shape == (b, *shape)
