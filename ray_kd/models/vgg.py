"""CIFAR VGGs with BN (the RepDistiller/mdistiller variant).

VGG has 5 conv blocks. Here block 0 (at input resolution) is the stem and
blocks 1-4 are the 4 stages: stages 1-3 each open with a 2x2 max-pool, stage 4
does not (on 32x32 inputs RepDistiller skips that pool, so the last two blocks
both run at 4x4). The classifier is one linear layer after global pooling.
"""

from __future__ import annotations

from torch import nn

from ray_kd.models.base import ClassifierHead, StagedNet
from ray_kd.models.layers import conv_bn, init_weights
from ray_kd.models.registry import register_model

# Output channels of each conv, per block.
_CONFIGS = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _block(in_channels: int, widths: list[int], pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.MaxPool2d(2)] if pool else []
    for w in widths:
        layers.append(conv_bn(in_channels, w))
        in_channels = w
    return nn.Sequential(*layers)


class VGG(StagedNet):
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        blocks = _CONFIGS[depth]
        self.stem = _block(in_channels, blocks[0], pool=False)
        self.stages = nn.ModuleList(
            _block(prev[-1], widths, pool=i < 3)
            for i, (prev, widths) in enumerate(zip(blocks[:-1], blocks[1:]))
        )
        self.stage_channels = [widths[-1] for widths in blocks[1:]]
        self.head = ClassifierHead(self.stage_channels[-1], num_classes)
        init_weights(self)


@register_model
def vgg8(num_classes: int, in_channels: int = 3) -> StagedNet:
    return VGG(8, num_classes, in_channels)


@register_model
def vgg11(num_classes: int, in_channels: int = 3) -> StagedNet:
    return VGG(11, num_classes, in_channels)


@register_model
def vgg13(num_classes: int, in_channels: int = 3) -> StagedNet:
    return VGG(13, num_classes, in_channels)


@register_model
def vgg16(num_classes: int, in_channels: int = 3) -> StagedNet:
    return VGG(16, num_classes, in_channels)


@register_model
def vgg19(num_classes: int, in_channels: int = 3) -> StagedNet:
    return VGG(19, num_classes, in_channels)
