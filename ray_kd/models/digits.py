"""Small CNNs for 8x8 one-channel digits (sklearn's `load_digits`): a quick KD testbed.

Each stage is one conv3x3-BN-ReLU; a stride-2 stage halves the 8x8 map.
`digits_cnn_s` (~6k params) is the student, `digits_cnn_l` (~80k) the teacher.
"""

from __future__ import annotations

from torch import nn

from ray_kd.models.base import ClassifierHead, StagedNet
from ray_kd.models.layers import conv_bn, init_weights
from ray_kd.models.registry import register_model


class DigitsCNN(StagedNet):
    def __init__(self, stem_channels: int, stages: list[tuple[int, int]], num_classes: int,
                 in_channels: int = 1):
        """`stages` is a list of (out_channels, stride)."""
        super().__init__()
        self.stem = conv_bn(in_channels, stem_channels)
        self.stages = nn.ModuleList()
        c = stem_channels
        for width, stride in stages:
            self.stages.append(conv_bn(c, width, stride=stride))
            c = width
        self.stage_channels = [width for width, _ in stages]
        self.head = ClassifierHead(c, num_classes)
        init_weights(self)


@register_model
def digits_cnn_s(num_classes: int, in_channels: int = 1) -> StagedNet:
    return DigitsCNN(8, [(16, 1), (32, 2)], num_classes, in_channels)


@register_model
def digits_cnn_l(num_classes: int, in_channels: int = 1) -> StagedNet:
    return DigitsCNN(32, [(48, 1), (64, 2), (64, 2)], num_classes, in_channels)
