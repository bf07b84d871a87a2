"""The student alone: cross-entropy on the labels, no teacher, no peers (the baseline)."""

from __future__ import annotations

from ray_kd.methods.base import Method
from ray_kd.methods.losses import cross_entropy


class CrossEntropy(Method):
    name = "ce"

    def loss(self, role, outputs, published, y):
        return self.with_total({"ce": cross_entropy(outputs["logits"], y)})
