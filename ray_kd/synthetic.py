"""The synthesized simple dataset LW-KD's lightweight teacher learns from: digit glyphs, drawn procedurally.

Class c of K is the number c written with as many digits as K - 1 has (10
classes: 0-9; 100 classes: 00-99; any K works), from a built-in 5x7 pixel font,
so nothing is downloaded. Each sample is the glyph string under a random affine
warp (rotation, scale, shear, shift), a random stroke weight, random ink and
background levels and pixel noise, rendered straight at the target image size
(e.g. 8x8 for the digits, 32x32 for CIFAR) in one grey channel. Everything is
drawn from one `torch.Generator`, so a seed fixes every pixel, and a batch of
thousands renders in milliseconds: the LW-KD teacher can draw a fresh sample of
each label at every step.

Images are normalised with fixed constants (`MEAN`, `STD`), not statistics of
one drawn set, so the teacher sees identically scaled inputs when trained on a
stored split (`data.dataset: synthetic`) and when fed fresh draws during LW-KD.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F

CHANNELS = 1
MEAN, STD = 0.5, 0.5

_FONT = {  # 5 columns x 7 rows per digit
    0: (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    1: ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    2: (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    3: ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    4: ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    5: ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    6: ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    7: ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    8: (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    9: (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
_GLYPHS = torch.tensor([[[c == "#" for c in row] for row in _FONT[d]] for d in range(10)], dtype=torch.float32)


def digits_per_class(num_classes: int) -> int:
    return len(str(max(num_classes - 1, 0)))


def render(labels: torch.Tensor, num_classes: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """One fresh sample of each label: N x 1 x size x size, uint8."""
    n, d = len(labels), digits_per_class(num_classes)
    place = 10 ** torch.arange(d - 1, -1, -1)
    digits = (labels.cpu().view(-1, 1) // place) % 10  # n x d, most significant first
    glyphs = F.pad(_GLYPHS[digits], (0, 1))  # n x d x 7 x 6: one blank column after each digit
    text = glyphs.permute(0, 2, 1, 3).reshape(n, 7, 6 * d)[:, :, :-1]
    side = max(7, 6 * d - 1) + 2
    top, left = (side - 7) // 2, (side - text.shape[2]) // 2
    canvas = F.pad(text, (left, side - text.shape[2] - left, top, side - 7 - top)).unsqueeze(1)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle, scale = uniform(-math.radians(15), math.radians(15)), uniform(0.8, 1.1)
    shear, shift_x, shift_y = uniform(-0.25, 0.25), uniform(-0.1, 0.1), uniform(-0.1, 0.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # output -> glyph coordinates
    theta = torch.stack([torch.stack([cos, -sin + shear, shift_x], 1),
                         torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    ink = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ink = ink.clamp(0, 1) ** uniform(0.5, 1.5).view(n, 1, 1, 1)  # stroke weight
    background, foreground = uniform(0.0, 0.25).view(n, 1, 1, 1), uniform(0.7, 1.0).view(n, 1, 1, 1)
    noise = uniform(0.0, 0.08).view(n, 1, 1, 1) * torch.randn(n, 1, size, size, generator=generator)
    image = background + (foreground - background) * ink + noise
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> the teacher's input scale; the same arithmetic as `Dataset.normalize` with MEAN/STD."""
    return (images.float().div_(255) - MEAN) / STD


def make_splits(classes: int, size: int, per_class: int, seed: int = 0
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test) as (uint8 images, labels); per_class of every class in train, a fifth of that in test."""
    generator = torch.Generator().manual_seed(seed)
    splits = []
    for n in (per_class, max(1, per_class // 5)):
        labels = torch.arange(classes).repeat(n)
        splits.append((render(labels, classes, size, generator), labels))
    return splits[0], splits[1]
