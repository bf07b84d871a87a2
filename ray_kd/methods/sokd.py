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

from ray_kd.methods.base import Method, MethodParams
from ray_kd.methods.losses import cross_entropy, soft_target
from ray_kd.models import create_model
from ray_kd.models.base import ClassifierHead
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

    def __init__(self, teacher_model: str, channels: int, num_classes: int):
        super().__init__()
        self.stage = create_model(teacher_model, num_classes).stages[-1]  # new weights, same architecture
        self.head = ClassifierHead(channels, num_classes,
                                   pre=nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True)))
        init_weights(self.head)

    def forward(self, penultimate: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(penultimate))


class SOKD(Method):
    name = "sokd"
    Params = SOKDParams
    needs_teacher = True

    def extras(self, role, backbone, num_classes):
        if not role.is_teacher:
            return {}
        return {"bridge": KnowledgeBridge(role.model, backbone.stage_channels[-1], num_classes)}

    def set_train_mode(self, role, net):
        super().set_train_mode(role, net)
        if role.is_teacher and self.params.teacher_bn == "train":
            net.backbone.train()

    def forward(self, role, net, x, y):
        if not role.is_teacher:
            return super().forward(role, net, x, y)
        logits, features = net.backbone(x)
        return {"logits": logits, "bridge": net.extras["bridge"](features[-2].detach())}

    def publish(self, role, outputs):
        if role.is_teacher:  # the students learn from the bridge only
            return {"bridge": outputs["bridge"].detach()}
        return super().publish(role, outputs)

    def loss(self, role, outputs, published, y):
        p, T = self.params, self.params.temperature
        if role.is_teacher:
            z_a = outputs["bridge"]
            students = [out["logits"] for name, out in published.items() if name != role.name]
            return self.with_total({
                "bridge_ce": p.bridge_ce_weight * cross_entropy(z_a, y),
                "bridge_teacher": p.bridge_teacher_weight * soft_target(z_a, outputs["logits"], T),
                "bridge_student": p.bridge_student_weight * sum(soft_target(z_a, z_s, T) for z_s in students)
                / len(students),
            })
        z_s = outputs["logits"]
        return self.with_total({
            "ce": p.ce_weight * cross_entropy(z_s, y),
            "kd": p.kd_weight * self.distill(role, z_s, published["teacher"]["bridge"], T),
        })

    def eval_heads(self, role, outputs):
        if role.is_teacher:
            return {"teacher": outputs["logits"], "bridge": outputs["bridge"]}
        return super().eval_heads(role, outputs)
