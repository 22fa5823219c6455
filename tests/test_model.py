"""ResNet-18 shape, size, memory-format and MAC-count checks (small inputs: CPU, 2 cores)."""

import subprocess
import sys

import pytest
import torch
import torchvision
from conftest import ROOT
from torch import nn

from engine.config import ARCHS
from engine.model import PointwiseConv, ResNet18, build_model, eval_mode, forward_macs


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_param_count_matches_kuangliu_resnet18():
    assert n_params(ResNet18(num_classes=10, width=64)) == 11_173_962


def torchvision_resnet18(model: ResNet18) -> nn.Module:
    """torchvision's ResNet-18 given kuangliu's CIFAR stem (3x3 stride-1, no max-pool), holding
    `model`'s weights and statistics: an independent build of the architecture to compare with."""
    reference = torchvision.models.resnet18(num_classes=model.fc.out_features)
    reference.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    reference.maxpool = nn.Identity()
    theirs = {"stem.0.": "conv1.", "stem.1.": "bn1.", ".shortcut.": ".downsample."}
    state = {}
    for key, value in model.state_dict().items():
        for old, new in theirs.items():
            key = key.replace(old, new)
        state[key] = value
    reference.load_state_dict(state)  # strict: each tensor has one place there, of its shape
    return reference


def test_resnet18_computes_what_torchvisions_does_with_the_cifar_stem():
    """Layer for layer (BatchNorm after each convolution, ReLU after the residual add and in the
    stem, projection shortcuts, average pool) the same network: the same weights give the same
    scores in eval and in training mode (the parameter count pins the shapes, not the wiring)."""
    torch.manual_seed(0)
    model = ResNet18(width=64)
    with torch.no_grad():  # BatchNorm away from its identity initialisation, so each one counts
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, (low, high) in zip((m.weight, m.bias, m.running_mean, m.running_var),
                                          ((0.5, 1.5), (-0.5, 0.5), (-0.5, 0.5), (0.5, 1.5)),
                                          strict=True):
                    t.uniform_(low, high)
    reference = torchvision_resnet18(model)
    x = torch.randn(2, 3, 32, 32)
    for training in (False, True):
        model.train(training)
        reference.train(training)
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


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
    """By name, with the classes and width asked for; an unknown name is refused."""
    model = build_model("resnet18", 100, 12)
    assert isinstance(model, ResNet18)
    assert (model.stem[0].out_channels, model.fc.out_features) == (12, 100)
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


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eval_mode_puts_back_the_mode_it_found(training):
    """A model in eval mode (a tool's, a checkpoint's) stays in it after eval_mode and
    forward_macs: BatchNorm would otherwise go on updating its statistics in later passes."""
    model = build_model("resnet18", 10, 4).train(training)
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training == training for m in model.modules())
    forward_macs(model)
    assert all(m.training == training for m in model.modules())


def test_forward_macs_resnet18():
    """The known ~0.556 GMACs, counted by hand: each 3x3 conv is output pixels x channels x 9
    x input channels; layers 2-4 each halve the side and double the channels, so cost alike."""
    stem = 32 * 32 * 64 * 27
    layer1 = 4 * 32 * 32 * 64 * 9 * 64
    layer2 = 16 * 16 * 128 * (9 * 64 + 3 * 9 * 128 + 64)  # conv1, 3 more convs, the 1x1 shortcut
    assert forward_macs(ResNet18(width=64)) == stem + layer1 + 3 * layer2 + 512 * 10


def test_pointwise_conv_equals_a_strided_convolution():
    """Subsampling, then a stride-1 convolution, computes what a stride-2 1x1 one does."""
    torch.manual_seed(0)
    ours = PointwiseConv(8, 16, stride=2)
    plain = nn.Conv2d(8, 16, 1, stride=2, bias=False)
    plain.weight.data.copy_(ours.weight.data)
    x = torch.randn(4, 8, 32, 32, requires_grad=True)  # contiguous: the plain path is safe
    y = torch.randn(4, 16, 16, 16)
    (ours(x) * y).sum().backward()
    grad_x, grad_w = x.grad.clone(), ours.weight.grad.clone()
    x.grad = None
    (plain(x) * y).sum().backward()
    assert torch.allclose(grad_x, x.grad, atol=1e-5)
    assert torch.allclose(grad_w, plain.weight.grad, atol=1e-4)
    assert torch.allclose(ours(x), plain(x), atol=1e-5)


# Every batch size for the widths whose stride-2 shortcut sees fewer input channels than
# AVX-512's block of 16 (oneDNN's bug) and the first width past it; a few for the wider ones,
# whose bigger batches cost most of the sweep's time and none of its reach into the bug.
BATCHES = (1, 2, 3, 5, 7, 31, 63, 64, 65)
SWEPT = {**{w: BATCHES for w in (4, 8, 12, 16)}, **{w: (1, 3, 65) for w in (24, 32, 64)}}
SWEEP = f"""
import torch, torch.nn.functional as F
from engine.model import build_model
for width, batches in {SWEPT}.items():
    for n in batches:
        torch.manual_seed(0)
        model = build_model("resnet18", 10, width).to(memory_format=torch.channels_last)
        x = torch.randn(n, 3, 32, 32).to(memory_format=torch.channels_last)
        F.cross_entropy(model(x), torch.zeros(n, dtype=torch.long)).backward()  # training step
        model.eval()
        x = x.clone().requires_grad_()
        model(x)[:, 0].sum().backward()  # what Grad-CAM asks for: input gradients in eval mode
        print(width, n, flush=True)
"""


@pytest.mark.slow
def test_no_width_or_batch_size_crashes_the_cpu_backward():
    """torch 2.14's channels_last 1x1 stride-2 backward segfaults for widths 8 and 12 with odd
    batches (and broke report.py's Grad-CAM); the sweep runs in a process of its own, so a
    crash is an exit code here, naming the last (width, batch) that got through, not the end of
    the test session."""
    result = subprocess.run([sys.executable, "-c", SWEEP], capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    done = [tuple(map(int, line.split())) for line in result.stdout.splitlines()]
    assert result.returncode == 0, (f"crashed ({result.returncode}) after (width, batch) "
                                    f"{done[-1:]}: {result.stderr[-1000:]}")
    assert done == [(w, n) for w, batches in SWEPT.items() for n in batches]
