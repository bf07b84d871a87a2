"""The student alone: cross-entropy on the labels, no teacher, no peers (the baseline)."""

from __future__ import annotations

from ray_kd.methods.base import Method, RoleModule
from ray_kd.methods.losses import cross_entropy
from ray_kd.methods.registry import register_method


class AloneStudent(RoleModule):
    def loss(self, outputs, published, y, step):
        return {"ce": cross_entropy(outputs["logits"], y)}


@register_method
class CrossEntropy(Method):
    name = "ce"

    def build_role(self, role, backbone, num_classes):
        return AloneStudent(role, backbone)
