"""Warm-up KD: Hinton's KD whose distillation weight ramps up linearly over the first epochs (as DKD's does).

The example method of docs/adding-a-method.md, shipped as a plugin through the
`ray_kd.methods` entry point; `digits_mlp` is its example `ray_kd.models` entry, and `inverted_digits` the
example `ray_kd.datasets` entry of docs/adding-a-data-source.md.
"""

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ray_kd import DataSource, FrozenTeacher, Method, MethodParams, RoleModule, Split, StagedNet
from ray_kd.methods.losses import cross_entropy


class WarmupKDParams(MethodParams):
    temperature: float = Field(4.0, gt=0)
    kd_weight: float = Field(1.0, ge=0)
    warmup_epochs: int = Field(2, ge=0, description="epochs over which the KD weight ramps from 1/n to full")


class WarmupKDStudent(RoleModule):
    def loss(self, outputs, published, y, step):
        p, z = self.params, outputs["logits"]
        ramp = min(1.0, (step.epoch + 1) / p.warmup_epochs) if p.warmup_epochs else 1.0
        kd = self.distill(z, published["teacher"]["logits"], p.temperature)
        return {"ce": cross_entropy(z, y), "kd": ramp * p.kd_weight * kd}


class WarmupKD(Method):
    name = "warmup_kd"
    Params = WarmupKDParams
    needs_teacher = True

    def build_role(self, role, backbone, num_classes):
        return FrozenTeacher(role, backbone) if role.is_teacher else WarmupKDStudent(role, backbone, self.params)


class DigitsMLP(StagedNet):
    """Flatten -> two hidden layers as 1x1 'stages' (so stage-feature methods can pair with it) -> classifier."""

    def __init__(self, num_classes: int, in_channels: int = 1, side: int = 8, hidden: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * side * side, hidden), nn.ReLU(),
                                  nn.Unflatten(1, (hidden, 1, 1)))
        self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(hidden, hidden, 1), nn.ReLU())])
        self.stage_channels = [hidden]
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(hidden, num_classes))


def digits_mlp(num_classes: int, in_channels: int = 1) -> StagedNet:
    return DigitsMLP(num_classes, in_channels)


class InvertedDigits(DataSource):
    """scikit-learn's 8x8 digits drawn dark on light: the last 297 images are the test split."""

    name = "inverted_digits"
    plain = True  # a flipped or shifted digit can be another digit: data.augment=auto is none
    gray = True  # one channel: a pretrained role's RGB normalisation is not applied to it

    def load(self, cfg):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.from_numpy((255 - bunch.images * (255 / 16)).round().astype(np.uint8)).unsqueeze(1)
        labels = torch.from_numpy(bunch.target.astype(np.int64))
        return Split(images[:1500], labels[:1500]), Split(images[1500:], labels[1500:]), 10

    def identity(self, cfg):
        return self.name, "sklearn digits, inverted"
