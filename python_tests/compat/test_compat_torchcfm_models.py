"""loom_kernels.compat.torchcfm.models / .utils against TorchCFM's own (same seed, same numbers), and on their own.

TorchCFM's ``utils`` imports torchdyn at module level; where torchdyn is absent (CI installs torchcfm
without its dependencies) the module is loaded with a placeholder ``torchdyn.datasets`` so its torch-only
functions can still be compared; ``sample_moons`` is compared only with the real torchdyn, and checked in
closed form everywhere.
"""

import math
import sys
import types

import numpy as np
import pytest
import torch

from loom_kernels.compat.torchcfm.models import MLP, GradModel, UNetModel
from loom_kernels.compat.torchcfm.utils import (
    eight_normal_sample,
    plot_trajectories,
    sample_8gaussians,
    sample_moons,
    sample_normal,
    torch_wrapper,
)
from loom_kernels.compat.torchdyn import NeuralODE


@pytest.fixture
def theirs(monkeypatch):
    """torchcfm.utils (real torchdyn if importable, else a placeholder torchdyn.datasets); skips without torchcfm."""
    pytest.importorskip("torchcfm")
    try:
        import torchdyn.datasets  # noqa: F401
    except Exception:  # noqa: BLE001  (absent, or its own imports broken)
        stub, datasets = types.ModuleType("torchdyn"), types.ModuleType("torchdyn.datasets")
        datasets.generate_moons = None
        stub.datasets = datasets
        monkeypatch.setitem(sys.modules, "torchdyn", stub)
        monkeypatch.setitem(sys.modules, "torchdyn.datasets", datasets)
        monkeypatch.delitem(sys.modules, "torchcfm.utils", raising=False)
    import torchcfm.utils

    return torchcfm.utils


# ---- against torchcfm: same seed, same numbers ---------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_samplers_draw_torchcfms_numbers(theirs, n):
    for ours, ref, args in [
        (sample_8gaussians, theirs.sample_8gaussians, (n,)),
        (eight_normal_sample, theirs.eight_normal_sample, (n, 2, 3.0, 0.5)),
    ]:
        torch.manual_seed(n)
        a = ref(*args)
        torch.manual_seed(n)
        b = ours(*args)
        assert a.dtype == b.dtype and torch.equal(a, b)
        assert torch.equal(torch.rand(3), (torch.manual_seed(n), ref(*args), torch.rand(3))[2])  # same draws used


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_moons_draw_torchdyns_numbers(theirs, n):
    if theirs.generate_moons is None:
        pytest.skip("torchdyn is not installed: compared in closed form only")
    np.random.seed(n)
    a = theirs.sample_moons(n)
    np.random.seed(n)
    assert torch.equal(a, sample_moons(n))


def test_mlp_has_torchcfms_weights_and_outputs():
    models = pytest.importorskip("torchcfm.models.models")
    for kw in [dict(dim=2, time_varying=True), dict(dim=3, out_dim=5, w=16)]:
        torch.manual_seed(0)
        ref = models.MLP(**kw)
        torch.manual_seed(0)
        ours = MLP(**kw)
        assert ref.state_dict().keys() == ours.state_dict().keys()
        for k, v in ref.state_dict().items():
            assert torch.equal(v, ours.state_dict()[k]), k
        x = torch.randn(9, ours.net[0].in_features)
        assert torch.equal(ref(x), ours(x))
        grad_in = torch.randn(4, ours.net[0].in_features)
        a, b = models.GradModel(ref)(grad_in.clone()), GradModel(ours)(grad_in.clone())
        assert torch.equal(a, b)


def test_unet_takes_torchcfms_constructor_and_calls():
    """Same arguments and call convention as torchcfm's UNetModel (the networks differ: see the module docstring)."""
    unet = pytest.importorskip("torchcfm.models.unet")
    kw = dict(dim=(1, 28, 28), num_channels=32, num_res_blocks=1, class_cond=True, num_classes=10)
    ref, ours = unet.UNetModel(**kw), UNetModel(**kw)
    x, t, y = torch.randn(3, 1, 28, 28), torch.rand(3), torch.tensor([0, 4, 9])
    assert ref(t, x, y=y).shape == ours(t, x, y=y).shape == x.shape


# ---- on their own ------------------------------------------------------------------------------------------


def test_8gaussians_law():
    torch.manual_seed(0)
    x = sample_8gaussians(40000)
    assert x.shape == (40000, 2) and x.dtype == torch.float32
    angles = torch.atan2(x[:, 1], x[:, 0])
    centre = torch.round(angles / (math.pi / 4)) % 8
    counts = torch.bincount(centre.long(), minlength=8).double() / len(x)
    assert (counts - 1 / 8).abs().max() < 0.01  # uniform over the 8 centres
    snapped = 5 * torch.stack([torch.cos(centre * math.pi / 4), torch.sin(centre * math.pi / 4)], 1)
    resid = (x - snapped).double()
    assert resid.mean(0).abs().max() < 0.01
    assert abs(resid.std(0).mean().item() - 0.1**0.25) < 0.01  # covariance sqrt(var) I: sd var ** 0.25
    torch.manual_seed(0)
    z = sample_normal(40000)
    assert z.shape == (40000, 2) and abs(z.std().item() - 1) < 0.02 and z.mean(0).abs().max() < 0.02


@pytest.mark.parametrize("n", [1, 2, 5, 4096])
def test_moons_closed_form(n):
    """Undo the shared uniform shift: the points lie on torchdyn's two arcs, in order, evenly spaced."""
    np.random.seed(0)
    x = sample_moons(n).double()
    np.random.seed(0)
    shift = torch.from_numpy(np.random.rand(n, 1) * 0.2)
    base = (x + 1) / 3 - shift
    n_out = n // 2
    outer = torch.linspace(0, math.pi, n_out, dtype=torch.float64)
    inner = torch.linspace(0, math.pi, n - n_out, dtype=torch.float64)
    want = torch.cat([torch.stack([outer.cos(), outer.sin()], 1), torch.stack([1 - inner.cos(), 0.5 - inner.sin()], 1)])
    assert x.shape == (n, 2) and torch.allclose(base, want, atol=1e-6)


def test_mlp_forms():
    torch.manual_seed(0)
    m = MLP(dim=2, time_varying=True)
    assert [type(layer).__name__ for layer in m.net] == ["Linear", "SELU"] * 3 + ["Linear"]
    assert m.net[0].in_features == 3 and m.net[-1].out_features == 2 and m(torch.randn(4, 3)).shape == (4, 2)
    with pytest.raises(ValueError, match="MLP: w must be a positive int"):
        MLP(dim=2, w=0)


def test_unet_call_convention():
    model = UNetModel(dim=(1, 8, 8), num_channels=8, num_res_blocks=1, channel_mult=(1, 2))
    x = torch.randn(4, 1, 8, 8)
    v_scalar = model(torch.tensor(0.3), x)  # torchdyn passes a 0-dim t
    assert torch.allclose(v_scalar, model(torch.full((4,), 0.3), x))
    assert torch.allclose(v_scalar, model(torch.full((4, 2), 0.3), x))  # (B, k): first column
    with pytest.raises(ValueError, match="if and only if the model is class-conditional"):
        model(torch.rand(4), x, y=torch.zeros(4, dtype=torch.long))
    cond = UNetModel(dim=(1, 28, 28), num_channels=8, num_res_blocks=1, class_cond=True, num_classes=10)
    with pytest.raises(ValueError, match="if and only if"):
        cond(torch.rand(2), torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="no default channel_mult for image size 20"):
        UNetModel(dim=(1, 20, 20), num_channels=8, num_res_blocks=1)
    with pytest.raises(ValueError, match="learn_sigma"):
        UNetModel(dim=(1, 28, 28), num_channels=8, num_res_blocks=1, learn_sigma=True)
    with torch.no_grad():  # a NeuralODE drives it as torchdyn would
        traj = NeuralODE(model, solver="euler").trajectory(x, t_span=torch.linspace(0, 1, 3))
    assert traj.shape == (3, 4, 1, 8, 8)


def test_torch_wrapper_and_plot(monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    monkeypatch.setattr(plt, "show", lambda: None)
    torch.manual_seed(0)
    model = MLP(dim=2, time_varying=True)
    with torch.no_grad():
        traj = NeuralODE(torch_wrapper(model), solver="euler").trajectory(
            sample_8gaussians(64), torch.linspace(0, 1, 5)
        )
        x = torch.randn(6, 2)
        assert torch.equal(
            torch_wrapper(model)(torch.tensor(0.25), x), model(torch.cat([x, torch.full((6, 1), 0.25)], 1))
        )
    plot_trajectories(traj.numpy())
    assert len(plt.gcf().axes[0].collections) == 3
    plt.close("all")
