"""ShuffleNetV2 1x for CIFAR (widths 116/232/464, 3/7/3 units; mdistiller's `ShuffleV2`).

A 1x1 stem to 24 channels; each stage is a stride-2 down unit followed by basic
units. The final 1x1 conv to 1024 channels is the head's `pre`.
"""

from __future__ import annotations

import torch
from torch import nn

from ray_kd.models.base import ClassifierHead, StagedNet
from ray_kd.models.layers import channel_shuffle, conv_bn, init_weights
from ray_kd.models.registry import register_model


def _branch(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """1x1 conv-BN-ReLU, 3x3 depthwise-BN, 1x1 conv-BN-ReLU."""
    return nn.Sequential(
        conv_bn(in_channels, out_channels, kernel_size=1),
        conv_bn(out_channels, out_channels, stride=stride, groups=out_channels, relu=False),
        conv_bn(out_channels, out_channels, kernel_size=1),
    )


class BasicUnit(nn.Module):
    """Split channels in half; one half passes through, the other through a branch."""

    def __init__(self, channels: int):
        super().__init__()
        self.branch = _branch(channels // 2, channels // 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, work = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([keep, self.branch(work)], 1), 2)


class DownUnit(nn.Module):
    """Both halves see the whole input, each downsampling by a stride-2 depthwise conv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        half = out_channels // 2
        self.left = nn.Sequential(
            conv_bn(in_channels, in_channels, stride=2, groups=in_channels, relu=False),
            conv_bn(in_channels, half, kernel_size=1),
        )
        self.right = _branch(in_channels, half, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2(StagedNet):
    def __init__(self, num_classes: int, in_channels: int = 3,
                 widths: tuple[int, ...] = (116, 232, 464), units: tuple[int, ...] = (3, 7, 3),
                 last_channels: int = 1024):
        super().__init__()
        self.stem = conv_bn(in_channels, 24, kernel_size=1)
        self.stages = nn.ModuleList()
        c = 24
        for width, n in zip(widths, units):
            self.stages.append(
                nn.Sequential(DownUnit(c, width), *(BasicUnit(width) for _ in range(n)))
            )
            c = width
        self.stage_channels = list(widths)
        self.head = ClassifierHead(last_channels, num_classes,
                                   pre=conv_bn(c, last_channels, kernel_size=1))
        init_weights(self)


@register_model
def shufflenetv2(num_classes: int, in_channels: int = 3) -> StagedNet:
    return ShuffleNetV2(num_classes, in_channels)
