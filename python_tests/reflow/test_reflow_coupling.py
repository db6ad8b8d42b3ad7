"""ReflowCoupling (issue 31): the stored pairs, noise regenerated from seeds, the protocol's keywords, bad input."""

import numpy as np
import pytest
import torch

from loom_kernels.couplings import Coupling
from loom_kernels.couplings.factory import make_coupling
from loom_kernels.couplings.reflow import ReflowCoupling
from loom_kernels.noise import gaussian_noise
from loom_kernels.reflow import generate_pairs, pairs_dataset
from reflow_helpers import TinyConditional, TinyField, euler_reference


@pytest.fixture
def pairs(tmp_path):
    generate_pairs(TinyField(), 50, "euler", 4, str(tmp_path / "p"), batch_size=25, device="cpu", progress=False)
    return str(tmp_path / "p")


def test_x0_is_the_noise_each_target_came_from(pairs):
    c = ReflowCoupling(pairs)
    ds = pairs_dataset(pairs)
    assert isinstance(c, Coupling) and len(c) == len(ds) == 50
    idx = torch.tensor([49, 3, 3, 17])
    x1, y = ds.batch(idx)
    assert y is None
    x0, x1b, perm = c(x1, idx, return_indices=True)
    assert x1b is x1 and torch.equal(perm, torch.arange(4))
    seeds = np.load(f"{pairs}/seeds.npy")
    assert torch.equal(x0, gaussian_noise(torch.from_numpy(seeds[idx.numpy()]), (2,)))
    # The pair is the model's ODE solution from that noise (float64 reference).
    torch.testing.assert_close(euler_reference(TinyField(), x0, 4).float(), x1, atol=1e-5, rtol=0)
    assert float(c.stats["pre_cost"]) == pytest.approx(float((x1 - x0).pow(2).sum(1).mean()), rel=1e-6)
    assert int(c.stats["swaps"]) == 0 and c.state_dict() == {}
    x0h, _ = c(x1.double(), idx.tolist())  # dtype follows x1; indices as a list
    assert x0h.dtype == torch.float64


def test_a_plain_loop_and_the_factory(pairs):
    c = make_coupling("reflow", pairs=pairs)
    loader = torch.utils.data.DataLoader(pairs_dataset(pairs), batch_size=16, shuffle=True)
    seen = 0
    for idx, x1 in loader:
        x0, _ = c(x1, idx)
        seen += len(idx)
        assert x0.shape == x1.shape
    assert seen == 50
    with pytest.raises(ValueError, match="coupling 'reflow' needs pairs="):
        make_coupling("reflow")


def test_labels_are_the_stored_ones(tmp_path):
    out = str(tmp_path / "c")
    generate_pairs(TinyConditional(), 12, "euler", 2, out, labels="balanced", device="cpu", progress=False)
    ds = pairs_dataset(out)
    c = ReflowCoupling(out)
    idx = torch.arange(12)
    x1, y = ds.batch(idx)
    assert torch.equal(y, torch.arange(12) % 3)
    c(x1, idx, labels=y)
    with pytest.raises(ValueError, match="labels differ from the labels stored"):
        c(x1, idx, labels=(y + 1) % 3)


def test_bad_calls(pairs):
    c = ReflowCoupling(pairs)
    x1 = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="needs the dataset indices"):
        c(x1)
    with pytest.raises(ValueError, match="x0 must be None"):
        c(x1, torch.arange(3), x0=torch.zeros(3, 2))
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 50\)"):
        c(x1, torch.tensor([0, 1, 50]))
    with pytest.raises(TypeError, match="integer pair indices"):
        c(x1, torch.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(b,\) = \(3,\)"):
        c(x1, torch.arange(4))
    with pytest.raises(ValueError, match=r"the pairs' shape \(2,\)"):
        c(torch.zeros(3, 3), torch.arange(3))
    c(x1, torch.arange(3), labels=torch.zeros(3, dtype=torch.long))  # no stored labels: any labels hold
    with pytest.raises(TypeError, match="return_indices must be True or False"):
        c(x1, torch.arange(3), return_indices=1)


def test_the_torchcfm_layer_on_reflow_pairs(pairs):
    from loom_kernels.compat.torchcfm import ConditionalFlowMatcher

    c, ds = ReflowCoupling(pairs), pairs_dataset(pairs)
    idx = torch.arange(10)
    x0, x1 = c(ds.batch(idx)[0], idx)
    t, xt, ut = ConditionalFlowMatcher(sigma=0.0).sample_location_and_conditional_flow(x0, x1, t="u_shaped")
    torch.testing.assert_close(xt, t[:, None] * x1 + (1 - t[:, None]) * x0)
    torch.testing.assert_close(ut, x1 - x0)
