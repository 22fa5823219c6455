"""CIFAR ResNet-18 (He et al. 2016; the kuangliu/pytorch-cifar variant) and its MAC count."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ARCHS


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution that, given a stride, subsamples first and convolves with stride 1:
    the same numbers, with no strided 1x1 kernel on either device. On the CPU, oneDNN's
    strided 1x1 backward-weights kernel on channels_last input with fewer input channels than
    its SIMD block (16 with AVX-512, 8 with AVX2) writes past its scratch buffer
    (uxlfoundation/oneDNN#6035, in the oneDNN 3.12 bundled with torch 2.14): it killed the
    process at widths 4, 8 and 12, in training and in Grad-CAM (tests/test_model.py sweeps
    widths and batch sizes). On the H200, cuDNN's heuristics ran layer2's strided forward (by
    launch order) through two layout transposes around a non-tensor-core kernel, 186 us, where
    layer3's and layer4's took 12.4 and 10.9 (benchmarks/results/h200-2026-12-04/
    trace-kernel-kinds.log); at stride 1 it is a plain GEMM over a quarter of the pixels (what
    that gains there is not measured yet: BENCHMARKS.md)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            return super().forward(x)
        sy, sx = self.stride
        return F.conv2d(x[:, :, ::sy, ::sx], self.weight)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection; the ResNet-18/34 building block."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        # Identity when shapes match; otherwise a 1x1 projection (option B of the ResNet paper).
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(PointwiseConv(in_ch, out_ch, stride),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Not in-place: Grad-CAM hooks read block outputs and in-place ops would clobber them.
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem and no max-pool, so layer4 sees 4x4 maps."""

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        chans = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.layer1 = self._stage(width, chans[0], stride=1)
        self.layer2 = self._stage(chans[0], chans[1], stride=2)
        self.layer3 = self._stage(chans[1], chans[2], stride=2)
        self.layer4 = self._stage(chans[2], chans[3], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chans[3], num_classes)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
        """Two BasicBlocks; only the first one changes resolution and channel count."""
        return nn.Sequential(BasicBlock(in_ch, out_ch, stride), BasicBlock(out_ch, out_ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        # flatten, not .view: under channels_last the pooled (N, C, 1, 1) tensor is
        # view-compatible too, but flatten never needs to care which layout it was given
        return self.fc(torch.flatten(self.pool(x), 1))


def build_model(arch: str, num_classes: int, width: int) -> nn.Module:
    """Build a model by name, so configs and checkpoints can refer to it as a string."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return ResNet18(num_classes=num_classes, width=width)


def forward_macs(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """Multiply-accumulates (MACs, not FLOPs; 1 MAC = 2 FLOPs) of one forward pass per image.

    Counts only nn.Conv2d and nn.Linear, which dominate the cost: the hand count that
    tools/bench_mfu.py reports beside torch's FlopCounterMode count, to cross-check it (MFU
    uses the counted FLOPs).
    """
    macs = 0

    def conv_hook(m: nn.Conv2d, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        kh, kw = m.kernel_size
        macs += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        macs += out.numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    p = next(model.parameters())
    try:  # eval mode: the probe pass leaves BatchNorm's running statistics untouched
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(input_shape, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    return macs // input_shape[0]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block (BatchNorm uses its running statistics and
    leaves them alone), then back in the mode it was in, however the block ends."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
