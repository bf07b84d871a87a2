"""ShuffleNetV1 for CIFAR (g=3, widths 240/480/960, 4/8/4 units; mdistiller's `ShuffleV1`).

A 1x1 stem to 24 channels, then 3 stages, each opening with a stride-2 unit.
As in the KD benchmarks, the depthwise conv is followed by ReLU.
"""

from __future__ import annotations

import torch
from torch import nn

from ray_kd.models.base import ClassifierHead, StagedNet
from ray_kd.models.layers import channel_shuffle, conv_bn, init_weights
from ray_kd.models.registry import register_model

_STEM_CHANNELS = 24


class ShuffleUnit(nn.Module):
    """Grouped 1x1 -> shuffle -> 3x3 depthwise -> grouped 1x1, plus a shortcut.

    At stride 2 the shortcut is a 3x3 avg-pool that is concatenated, so the
    branch only makes `out_channels - in_channels` channels.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        branch = out_channels - in_channels if stride == 2 else out_channels
        mid = branch // 4
        # The stem's 24 channels are too few to split into groups.
        self.groups_in = 1 if in_channels == _STEM_CHANNELS else groups
        self.reduce = conv_bn(in_channels, mid, kernel_size=1, groups=self.groups_in)
        self.depthwise = conv_bn(mid, mid, stride=stride, groups=mid)
        self.expand = conv_bn(mid, branch, kernel_size=1, groups=groups, relu=False)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(self.reduce(x), self.groups_in)
        out = self.expand(self.depthwise(out))
        out = torch.cat([out, self.pool(x)], 1) if self.pool is not None else out + x
        return torch.relu(out)


class ShuffleNetV1(StagedNet):
    def __init__(self, num_classes: int, in_channels: int = 3, groups: int = 3,
                 widths: tuple[int, ...] = (240, 480, 960), units: tuple[int, ...] = (4, 8, 4)):
        super().__init__()
        self.stem = conv_bn(in_channels, _STEM_CHANNELS, kernel_size=1)
        self.stages = nn.ModuleList()
        c = _STEM_CHANNELS
        for width, n in zip(widths, units):
            self.stages.append(nn.Sequential(
                ShuffleUnit(c, width, 2, groups),
                *(ShuffleUnit(width, width, 1, groups) for _ in range(n - 1)),
            ))
            c = width
        self.stage_channels = list(widths)
        self.head = ClassifierHead(c, num_classes)
        init_weights(self)


@register_model
def shufflenetv1(num_classes: int, in_channels: int = 3) -> StagedNet:
    return ShuffleNetV1(num_classes, in_channels)
