"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016), CIFAR layout.

Depth 6n+4: a plain 3x3 stem (16 channels), 3 stages of n pre-activation blocks
(widths 16k, 32k, 64k at strides 1, 2, 2). Blocks are pre-activation, so stage
outputs are un-normalised sums; the head applies the final BN+ReLU.
"""

from __future__ import annotations

import torch
from torch import nn

from ray_kd.models.base import ClassifierHead, StagedNet
from ray_kd.models.layers import init_weights
from ray_kd.models.registry import register_model


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; a width/stride change projects the *activated* input by 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.pre = _bn_relu(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.mid = _bn_relu(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.projection = (
            None if stride == 1 and in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.pre(x)
        shortcut = x if self.projection is None else self.projection(act)
        return self.conv2(self.mid(self.conv1(act))) + shortcut


class WideResNet(StagedNet):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.stages = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            stride = 1 if i == 0 else 2
            self.stages.append(nn.Sequential(
                PreActBlock(c_in, c_out, stride),
                *(PreActBlock(c_out, c_out, 1) for _ in range(n - 1)),
            ))
        self.stage_channels = widths[1:]
        self.head = ClassifierHead(widths[-1], num_classes, pre=_bn_relu(widths[-1]))
        init_weights(self)


@register_model
def wrn_16_1(num_classes: int, in_channels: int = 3) -> StagedNet:
    return WideResNet(16, 1, num_classes, in_channels)


@register_model
def wrn_16_2(num_classes: int, in_channels: int = 3) -> StagedNet:
    return WideResNet(16, 2, num_classes, in_channels)


@register_model
def wrn_40_1(num_classes: int, in_channels: int = 3) -> StagedNet:
    return WideResNet(40, 1, num_classes, in_channels)


@register_model
def wrn_40_2(num_classes: int, in_channels: int = 3) -> StagedNet:
    return WideResNet(40, 2, num_classes, in_channels)
