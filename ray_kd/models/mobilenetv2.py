"""MobileNetV2 for CIFAR, as the KD benchmarks use it (mdistiller's `MobileNetV2`).

That is width 0.5, expansion 6, a stride-2 3x3 stem, and the usual 7 groups of
inverted residuals. The groups are merged into 4 stages by resolution
(16x16, 8x8, 4x4, 2x2 on 32x32 inputs), the same cut points mdistiller takes
its features from. The final 1x1 conv to 1280 channels is the head's `pre`.
"""

from __future__ import annotations

import torch
from torch import nn

from ray_kd.models.base import ClassifierHead, StagedNet
from ray_kd.models.layers import conv_bn, init_weights
from ray_kd.models.registry import register_model

# (expansion, channels, blocks, first stride) per group; None means the net's `expansion`.
_GROUPS = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
           (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]
# Which groups make up each stage.
_STAGES = [(0, 1), (2,), (3, 4), (5, 6)]


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> linear 1x1 project; residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.body = nn.Sequential(
            conv_bn(in_channels, hidden, kernel_size=1),
            conv_bn(hidden, hidden, stride=stride, groups=hidden),
            conv_bn(hidden, out_channels, kernel_size=1, relu=False),
        )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetV2(StagedNet):
    def __init__(self, num_classes: int, in_channels: int = 3, expansion: int = 6,
                 width: float = 0.5, last_channels: int = 1280):
        super().__init__()
        c = int(32 * width)
        self.stem = conv_bn(in_channels, c, stride=2)
        groups = []
        for t, channels, n, stride in _GROUPS:
            out = int(channels * width)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(c, out, stride if i == 0 else 1, t or expansion))
                c = out
            groups.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(nn.Sequential(*(groups[g] for g in ids)) for ids in _STAGES)
        self.stage_channels = [int(_GROUPS[ids[-1]][1] * width) for ids in _STAGES]
        self.head = ClassifierHead(last_channels, num_classes,
                                   pre=conv_bn(c, last_channels, kernel_size=1))
        init_weights(self)


@register_model
def mobilenetv2(num_classes: int, in_channels: int = 3) -> StagedNet:
    return MobileNetV2(num_classes, in_channels)
