"""CIFAR ResNets (He et al. 2016, as used by RepDistiller/mdistiller).

Depth 6n+2: a 3x3 stem, then 3 stages of n BasicBlocks at strides 1, 2, 2.
Widths (stem, stage1, stage2, stage3) are 16/16/32/64, or 32/64/128/256 for the
"x4" variants the KD literature uses as teachers.
"""

from __future__ import annotations

import torch
from torch import nn

from ray_kd.models.base import ClassifierHead, StagedNet
from ray_kd.models.layers import conv_bn, init_weights
from ray_kd.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN with an identity (or 1x1 projection) shortcut; ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(in_channels, out_channels, stride=stride),
            conv_bn(out_channels, out_channels, relu=False),
        )
        self.shortcut = (
            nn.Identity() if stride == 1 and in_channels == out_channels
            else conv_bn(in_channels, out_channels, kernel_size=1, stride=stride, relu=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class CifarResNet(StagedNet):
    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int,
                 in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = conv_bn(in_channels, widths[0])
        self.stages = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            stride = 1 if i == 0 else 2
            self.stages.append(nn.Sequential(
                BasicBlock(c_in, c_out, stride),
                *(BasicBlock(c_out, c_out, 1) for _ in range(n - 1)),
            ))
        self.stage_channels = list(widths[1:])
        self.head = ClassifierHead(widths[-1], num_classes)
        init_weights(self)


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model
def resnet8(num_classes: int, in_channels: int = 3) -> StagedNet:
    return CifarResNet(8, _NARROW, num_classes, in_channels)


@register_model
def resnet14(num_classes: int, in_channels: int = 3) -> StagedNet:
    return CifarResNet(14, _NARROW, num_classes, in_channels)


@register_model
def resnet20(num_classes: int, in_channels: int = 3) -> StagedNet:
    return CifarResNet(20, _NARROW, num_classes, in_channels)


@register_model
def resnet32(num_classes: int, in_channels: int = 3) -> StagedNet:
    return CifarResNet(32, _NARROW, num_classes, in_channels)


@register_model
def resnet44(num_classes: int, in_channels: int = 3) -> StagedNet:
    return CifarResNet(44, _NARROW, num_classes, in_channels)


@register_model
def resnet56(num_classes: int, in_channels: int = 3) -> StagedNet:
    return CifarResNet(56, _NARROW, num_classes, in_channels)


@register_model
def resnet110(num_classes: int, in_channels: int = 3) -> StagedNet:
    return CifarResNet(110, _NARROW, num_classes, in_channels)


@register_model
def resnet8x4(num_classes: int, in_channels: int = 3) -> StagedNet:
    return CifarResNet(8, _WIDE, num_classes, in_channels)


@register_model
def resnet32x4(num_classes: int, in_channels: int = 3) -> StagedNet:
    return CifarResNet(32, _WIDE, num_classes, in_channels)
