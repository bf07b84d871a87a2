"""Factories for `model: tiny_factory:<name>` in tests: plain nn.Modules, not StagedNets."""

from torch import nn


def tiny_convnet(num_classes: int = 1000, in_channels: int = 3, width: int = 8) -> nn.Module:
    """Two conv blocks (the second halves the resolution) and a linear classifier; takes num_classes."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()),
        nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


def tiny_fixed_head(width: int = 8) -> nn.Module:
    """Takes no num_classes: ray-kd replaces its last Linear (5 outputs here)."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 5))
