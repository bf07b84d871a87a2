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


class _Branching(nn.Module):
    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(in_channels, 4, 3, padding=1), nn.Linear(4, num_classes)

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > 0:  # a branch on the data: torch.export (ONNX, pt2) cannot capture it
            x = x.relu()
        return self.fc(x.mean((2, 3)))


def tiny_branching(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return _Branching(num_classes, in_channels)
