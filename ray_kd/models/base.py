"""The shape every model in the zoo shares: stem -> stages -> head.

Distillation methods need more than logits: SOKD's bridge eats the teacher's
penultimate-stage map, MTKD-SSR puts a head on every stage. So every model is
a `StagedNet` and returns its per-stage feature maps beside its logits; no
method needs forward hooks.
"""

from __future__ import annotations

import torch
from torch import nn


class StagedNet(nn.Module):
    """stem -> stages[0] -> ... -> stages[-1] -> head (pooling + classifier).

    Subclasses build `stem`, `stages` (an `nn.ModuleList`), `head` (maps the last
    stage's map to logits) and set `stage_channels` (channels out of each stage).
    """

    stem: nn.Module
    stages: nn.ModuleList
    head: nn.Module
    stage_channels: list[int]
    logits_only = False
    """The served form (the logged MLflow model): images in, logits out, with the training form's state dict."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]] | torch.Tensor:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return self.head(x) if self.logits_only else (self.head(x), features)


class ClassifierHead(nn.Module):
    """Optional norm/activation, global average pooling, then a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, pre: nn.Module | None = None):
        super().__init__()
        self.pre = pre if pre is not None else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)
