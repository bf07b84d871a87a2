"""KD (Hinton et al. 2015): L_S = a*CE(z_S, y) + b*ST(z_S, z_T) from a frozen teacher."""

from __future__ import annotations

from pydantic import Field

from ray_kd.methods.base import FrozenTeacher, Method, MethodParams, RoleModule
from ray_kd.methods.losses import cross_entropy
from ray_kd.methods.registry import register_method


class KDParams(MethodParams):
    temperature: float = Field(4.0, gt=0)
    ce_weight: float = Field(0.1, ge=0)
    kd_weight: float = Field(0.9, ge=0)


class KDStudent(RoleModule):
    def loss(self, outputs, published, y, step):
        p, z_s = self.params, outputs["logits"]
        return {"ce": p.ce_weight * cross_entropy(z_s, y),
                "kd": p.kd_weight * self.distill(z_s, published["teacher"]["logits"], p.temperature)}


@register_method
class KD(Method):
    """Defaults are the RepDistiller/mdistiller CIFAR-100 protocol (T=4, a=0.1, b=0.9)."""

    name = "kd"
    Params = KDParams
    needs_teacher = True

    def build_role(self, role, backbone, num_classes):
        return FrozenTeacher(role, backbone) if role.is_teacher else KDStudent(role, backbone, self.params)
