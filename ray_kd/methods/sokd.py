"""SOKD (semi-online KD): a frozen teacher plus a trainable knowledge bridge, peer-taught by the students.

The knowledge bridge module (KBM) lives on the teacher's worker: a freshly
initialised copy of the teacher's last stage, then BN, ReLU, global average
pooling and a new linear classifier, fed the teacher's penultimate-stage map
(detached, and never sent anywhere). Each step is two-way: the students'
logits reach the teacher's worker, the bridge's logits (z_A) reach the students.

    L_KBM = CE(z_A, y) + ST(z_A, z_T) + mean_students ST(z_A, z_S)
    L_S   = CE(z_S, y) + ST(z_S, z_A)                          (T = 4, weights 1)

These, and the fresh (not copied) last stage, follow the authors' code
(swlzq/Semi-Online-KD). Their code leaves the frozen teacher's BatchNorm in
train mode, so its running statistics keep moving; here that is
`teacher_bn: train`, and the default is `eval` (a frozen teacher is frozen).
Either way the backbone gets no gradient and no optimiser state.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ray_kd.methods.base import Method, MethodParams, Role, RoleModule
from ray_kd.methods.losses import cross_entropy, soft_target
from ray_kd.methods.registry import register_method
from ray_kd.models import create_model
from ray_kd.models.base import ClassifierHead
from ray_kd.models.external import require_stages, role_field
from ray_kd.models.layers import init_weights


class SOKDParams(MethodParams):
    temperature: float = Field(4.0, gt=0)
    ce_weight: float = Field(1.0, ge=0, description="student: CE(z_S, y)")
    kd_weight: float = Field(1.0, ge=0, description="student: ST(z_S, z_A)")
    bridge_ce_weight: float = Field(1.0, ge=0, description="bridge: CE(z_A, y)")
    bridge_teacher_weight: float = Field(1.0, ge=0, description="bridge: ST(z_A, z_T)")
    bridge_student_weight: float = Field(1.0, ge=0, description="bridge: mean over students of ST(z_A, z_S)")
    teacher_bn: Literal["eval", "train"] = Field(
        "eval", description="the frozen backbone's BatchNorm mode while training (the authors' code: train)")


class KnowledgeBridge(nn.Module):
    """A fresh copy of the teacher's last stage, then BN-ReLU, global average pooling and a linear layer."""

    def __init__(self, teacher: Role, channels: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        fresh = create_model(teacher.model, num_classes, in_channels, **teacher.model_options)
        self.stage = fresh.stages[-1]  # new weights, same architecture
        self.head = ClassifierHead(channels, num_classes,
                                   pre=nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True)))
        init_weights(self.head)

    def forward(self, penultimate: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(penultimate))


class BridgedTeacher(RoleModule):
    """The frozen teacher plus its knowledge bridge, the only part of this role that trains."""

    def __init__(self, role, backbone, params: SOKDParams, num_classes: int):
        super().__init__(role, backbone, params, frozen_backbone=True)
        self.extras["bridge"] = KnowledgeBridge(role, backbone.stage_channels[-1], num_classes)

    def train(self, mode=True):
        super().train(mode)
        if mode and self.params.teacher_bn == "train":
            self.backbone.train()
        return self

    def forward(self, x, y):
        logits, features = self.backbone(x)
        return {"logits": logits, "bridge": self.extras["bridge"](features[-2].detach())}

    def publish(self, outputs):  # the students learn from the bridge only
        return {"bridge": outputs["bridge"].detach()}

    def loss(self, outputs, published, y, step):
        p, z_a = self.params, outputs["bridge"]
        students = [out["logits"] for name, out in published.items() if name != self.role.name]
        return {
            "bridge_ce": p.bridge_ce_weight * cross_entropy(z_a, y),
            "bridge_teacher": p.bridge_teacher_weight * soft_target(z_a, outputs["logits"], p.temperature),
            "bridge_student": p.bridge_student_weight
            * sum(soft_target(z_a, z_s, p.temperature) for z_s in students) / len(students),
        }

    def eval_heads(self, outputs):
        return {"teacher": outputs["logits"], "bridge": outputs["bridge"]}


class BridgeTaughtStudent(RoleModule):
    def loss(self, outputs, published, y, step):
        p, z_s = self.params, outputs["logits"]
        return {"ce": p.ce_weight * cross_entropy(z_s, y),
                "kd": p.kd_weight * self.distill(z_s, published["teacher"]["bridge"], p.temperature)}


@register_method
class SOKD(Method):
    name = "sokd"
    Params = SOKDParams
    needs_teacher = True

    def check_roles(self, roles, num_classes, in_channels):
        teacher = next(r for r in roles if r.is_teacher)
        net = create_model(teacher.model, num_classes, self.input_channels(teacher, in_channels),
                           **teacher.model_options)
        require_stages("sokd", teacher, net, role_field(teacher), min_stages=2, separable_last=True)

    def build_role(self, role, backbone, num_classes):
        if role.is_teacher:
            return BridgedTeacher(role, backbone, self.params, num_classes)
        return BridgeTaughtStudent(role, backbone, self.params)
