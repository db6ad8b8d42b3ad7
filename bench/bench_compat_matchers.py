"""Every TorchCFM flow matcher's ``sample_location_and_conditional_flow`` (ours against torchcfm's, same run),
and ``NeuralODE(...).trajectory`` (loom_kernels.compat.torchdyn against torchdyn and torchdiffeq).

Both matcher providers get the same batch (b = 128, D = 3072: CIFAR-shaped, flattened) and the same
seeds; the outputs are bit-identical (python_tests/compat/test_compat_torchcfm_matchers.py). The NeuralODE
case integrates TorchCFM's CIFAR UNet (``UNetModelWrapper`` as in train_cifar10.py) with Euler on
``torch.linspace(0, 1, STEPS + 1)``; torchdyn is skipped where it cannot be imported (its pinned
dependencies; see bench/RESULTS.md for how it was run).

Run: ``OMP_NUM_THREADS=1 python -m pytest bench/bench_compat_matchers.py --benchmark-columns=median,iqr,rounds``
(``LOOM_BENCH_UNET="batch,channels,steps[,rounds]"`` sizes the UNet case; default ``64,32,100,3``).
"""

import os

import numpy as np
import pytest
import torch

from loom_kernels.compat import torchcfm as ours

MATCHERS = {
    "icfm": ("ConditionalFlowMatcher", {"sigma": 0.0}),
    "otcfm": ("ExactOptimalTransportConditionalFlowMatcher", {"sigma": 0.0}),
    "fm": ("TargetConditionalFlowMatcher", {"sigma": 0.0}),
    "si": ("VariancePreservingConditionalFlowMatcher", {"sigma": 0.0}),
    "sbcfm": ("SchrodingerBridgeConditionalFlowMatcher", {"sigma": 1.0}),
    "sbcfm-sinkhorn": ("SchrodingerBridgeConditionalFlowMatcher", {"sigma": 40.0, "ot_method": "sinkhorn"}),
}


def _problem(b=128, d=3072):
    """Gaussian noise and a data-like batch (low-rank structure plus noise), shared by both providers."""
    g = torch.Generator().manual_seed(b + d)
    basis = torch.randn(32, d, generator=g) / 32**0.5
    x1 = torch.tanh(torch.randn(b, 32, generator=g) @ basis + 0.1 * torch.randn(b, d, generator=g))
    return torch.randn(b, d, generator=g), x1


@pytest.mark.parametrize("matcher", list(MATCHERS))
@pytest.mark.parametrize("provider", ["loom", "torchcfm"])
def test_sample_location_and_conditional_flow_cpu(benchmark, provider, matcher):
    torch.set_num_threads(1)
    name, kwargs = MATCHERS[matcher]
    if provider == "torchcfm":
        pytest.importorskip("ot")
        module = pytest.importorskip("torchcfm.conditional_flow_matching")
    else:
        module = ours
    fm = getattr(module, name)(**kwargs)
    x0, x1 = _problem()
    benchmark.group = f"sample_location_and_conditional_flow {matcher} cpu b=128 D=3072"
    benchmark.extra_info.update(provider=provider, threads=1)
    np.random.seed(0)
    t, xt, ut = benchmark(fm.sample_location_and_conditional_flow, x0, x1)
    assert xt.shape == x1.shape and ut.shape == x1.shape


def _unet_case():
    batch, channels, steps, *rounds = (int(v) for v in os.environ.get("LOOM_BENCH_UNET", "64,32,100,3").split(","))
    unet = pytest.importorskip("torchcfm.models.unet.unet")
    torch.manual_seed(0)
    model = unet.UNetModelWrapper(
        dim=(3, 32, 32),
        num_res_blocks=2,
        num_channels=channels,
        channel_mult=[1, 2, 2, 2],
        num_heads=4,
        num_head_channels=64,
        attention_resolutions="16",
        dropout=0.1,
    ).eval()
    return (
        model,
        torch.randn(batch, 3, 32, 32),
        torch.linspace(0, 1, steps + 1),
        (batch, channels, steps, rounds[0] if rounds else 3),
    )


@pytest.mark.parametrize("provider", ["loom", "torchdyn", "torchdiffeq"])
def test_neural_ode_trajectory_unet_cpu(benchmark, provider):
    model, x, t_span, (batch, channels, steps, rounds) = _unet_case()
    if provider == "loom":
        from loom_kernels.compat.torchdyn import NeuralODE

        call = NeuralODE(model, solver="euler", sensitivity="adjoint").trajectory
    elif provider == "torchdyn":
        try:
            from torchdyn.core import NeuralODE as TorchdynNODE
        except Exception as exc:  # noqa: BLE001  (torchdyn's pinned imports)
            pytest.skip(f"torchdyn is not importable: {exc}")
        call = TorchdynNODE(model, solver="euler", sensitivity="adjoint").trajectory
    else:
        torchdiffeq = pytest.importorskip("torchdiffeq")

        def call(x, t_span):
            return torchdiffeq.odeint(lambda t, y: model(t, y), x, t_span, method="euler")

    benchmark.group = f"NeuralODE.trajectory euler UNet cpu batch={batch} channels={channels} steps={steps}"
    benchmark.extra_info.update(provider=provider, threads=torch.get_num_threads())

    def run():
        with torch.no_grad():
            return call(x, t_span)

    traj = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    assert traj.shape == (steps + 1, *x.shape)
