"""Reflow pair generation (issue 31): ``generate_pairs`` against the sampler alone at the same size, and the
bytes on disk per pair against the noise + target format of LOOM-CFM's ``generate_pairs.py``.

    OMP_NUM_THREADS=1 python -m pytest bench/bench_reflow.py -q                 # CPU cases
    python -m pytest bench/bench_reflow.py -q -m cuda                           # GPU cases (CUDA graph)

Providers: ``sampler`` (per batch ``sample(model, torch.randn(...), 8)``, the outputs kept in memory: the
sampler alone), ``pairs`` (``generate_pairs`` into a new folder: seeds, noise from them, the same sampler
calls, targets written to the memory map, each batch flushed and committed). Target: ``pairs`` within
5% of ``sampler``. ``test_overhead_interleaved`` times the two alternately (the machine is shared) and
reports the median of the per-round ratios. Cases: ``mlp`` (2-D points, 3x256 MLP, 16384 pairs in
batches of 4096), ``conv`` ((1, 8, 8) images, small conv net, 1024 pairs in batches of 256); 8 Euler NFE.
"""

import os
import shutil
import statistics
import tempfile
import time

import pytest
import torch
from bench_sampler import MLP, ConvNet  # the sampler bench's models: the same calls timed there

from loom_kernels.reflow import generate_pairs
from loom_kernels.sampler import sample

NFE = 8
CASES = {"mlp": (16384, 4096, (2,)), "conv": (1024, 256, (1, 8, 8))}  # pairs, batch, target shape


def _setup(case, device):
    torch.manual_seed(0)
    model = (MLP() if case == "mlp" else ConvNet()).to(device).eval()
    model.shape = CASES[case][2]  # generate_pairs reads one target's shape from the model
    return model


def sampler_alone(model, case, device):
    num, batch, shape = CASES[case]
    out = []
    for a in range(0, num, batch):
        x0 = torch.randn(min(batch, num - a), *shape, device=device)
        out.append(sample(model, x0, NFE).cpu())
    return torch.cat(out)


def pairs(model, case, device, folder):
    num, batch, _ = CASES[case]
    return generate_pairs(model, num, "euler", NFE, folder, batch_size=batch, device=device, progress=False)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", ["sampler", "pairs"])
def test_generation(benchmark, provider, case, device, tmp_path):
    model = _setup(case, device)
    folder = str(tmp_path / "p")
    fn = (
        (lambda: sampler_alone(model, case, device))
        if provider == "sampler"
        else (lambda: pairs(model, case, device, folder))
    )
    fn()  # warm-up (CUDA graph capture on the second sampler call of a shape)
    benchmark.group = f"reflow pairs {case} {device}"
    benchmark.pedantic(fn, setup=lambda: shutil.rmtree(folder, ignore_errors=True), rounds=5, iterations=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_overhead_interleaved(benchmark, case, device):
    model = _setup(case, device)
    root = tempfile.mkdtemp(prefix="bench_reflow_")
    folder = os.path.join(root, "p")
    try:
        sampler_alone(model, case, device), pairs(model, case, device, os.path.join(root, "warm"))  # warm-up
        ratios, base, ours = [], [], []
        for _ in range(11):
            t0 = time.perf_counter()
            sampler_alone(model, case, device)
            if device == "cuda":
                torch.cuda.synchronize()
            shutil.rmtree(folder, ignore_errors=True)
            t1 = time.perf_counter()
            pairs(model, case, device, folder)
            t2 = time.perf_counter()
            base.append(t1 - t0)
            ours.append(t2 - t1)
            ratios.append((t2 - t1) / (t1 - t0))
        num, _, shape = CASES[case]
        target_bytes = 4 * torch.Size(shape).numel()
        disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        info = {
            "sampler_median_s": statistics.median(base),
            "pairs_median_s": statistics.median(ours),
            "ratio_median": statistics.median(ratios),
            "bytes_per_pair_on_disk": disk / num,
            "target_plus_8": target_bytes + 8,
            "noise_plus_target": 2 * target_bytes,
        }
        benchmark.extra_info.update(info)
        print(f"\n{case} {device}: " + ", ".join(f"{k} {v:.4g}" for k, v in info.items()))
        benchmark.group = f"reflow overhead {case} {device}"
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
