"""ResNet-18 shape, size, memory-format and MAC-count checks (small inputs: CPU, 2 cores)."""

import pytest
import torch
from torch import nn

from engine.model import ARCHS, ResNet18, build_model, forward_macs


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_param_count_matches_kuangliu_resnet18():
    assert n_params(ResNet18(num_classes=10, width=64)) == 11_173_962


@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape(num_classes: int):
    model = ResNet18(num_classes=num_classes, width=8)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)


def test_width_scales_channels():
    model = ResNet18(width=16)
    assert model.stem[0].out_channels == 16
    assert model.layer4[-1].conv2.out_channels == 128
    assert model.fc.in_features == 128
    assert n_params(model) < n_params(ResNet18(width=64))


def test_channels_last_is_kept():
    model = ResNet18(width=8).to(memory_format=torch.channels_last)
    seen = {}
    for name in ("layer1", "layer4"):
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, out)
        )
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    assert model(x).shape == (2, 10)
    for name, out in seen.items():
        assert out.is_contiguous(memory_format=torch.channels_last), name


def test_build_model():
    assert isinstance(build_model("resnet18", 10, 8), ResNet18)
    with pytest.raises(ValueError, match="resnet18"):
        build_model("resnet50", 10, 64)
    assert ARCHS == ("resnet18",)


def test_forward_macs_by_hand():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # 4*8*8 outputs, 3*3*3 MACs each
        nn.Conv2d(4, 4, 3, padding=1, groups=2),  # 4*8*8 outputs, (4/2)*3*3 MACs each
        nn.BatchNorm2d(4),  # not counted
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 5),  # 256*5
    )
    expected = 256 * 27 + 256 * 18 + 256 * 5
    assert forward_macs(net, (1, 3, 8, 8)) == expected
    # Per image, whatever the probe batch; and the probe leaves mode and BN statistics alone.
    assert forward_macs(net, (3, 3, 8, 8)) == expected
    assert net.training
    assert net[2].num_batches_tracked.item() == 0


def test_forward_macs_resnet18():
    assert forward_macs(ResNet18(width=64)) == pytest.approx(0.556e9, rel=0.01)
