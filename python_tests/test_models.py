"""loom_kernels.models: shapes, class conditioning (null label), spec round trip, errors."""

import pytest
import torch

from loom_kernels.models import MLPVelocity, UNet, build


@pytest.mark.parametrize("shape,mult", [((1, 8, 8), (1, 2)), ((3, 32, 32), (1, 2, 2))])
def test_unet_shapes_and_rebuild(shape, mult):
    net = UNet(shape, channels=8, channel_mult=mult, num_classes=10)
    x = torch.randn(3, *shape)
    out = net(x, torch.rand(3), y=torch.tensor([0, 9, 10]))  # 10 = the null label
    assert out.shape == x.shape
    twin = build(net.spec)
    twin.load_state_dict(net.state_dict())
    torch.testing.assert_close(twin(x, torch.full((3,), 0.3)), net(x, torch.full((3,), 0.3)))


def test_unet_labels_matter_and_none_means_null():
    net = UNet((1, 8, 8), channels=8, num_classes=3)
    with torch.no_grad():
        net.label_emb.weight.normal_()
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    assert not torch.allclose(net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([1, 1])))
    torch.testing.assert_close(net(x, t), net(x, t, torch.tensor([3, 3])))
    assert net.null_label == 3 and net.num_classes == 3


def test_unet_errors_and_mlp_still_builds():
    with pytest.raises(ValueError, match="divisible by"):
        UNet((1, 6, 6), channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match=r"shape must be \(C, H, W\)"):
        UNet((8, 8))
    with pytest.raises(ValueError, match="unconditional"):
        UNet((1, 8, 8), channels=8)(torch.zeros(1, 1, 8, 8), torch.zeros(1), y=torch.zeros(1, dtype=torch.long))
    assert isinstance(build(MLPVelocity((2,), hidden=8).spec), MLPVelocity)
    with pytest.raises(ValueError, match="'mlp' or 'unet'"):
        build({"kind": "vit"})
