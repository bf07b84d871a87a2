"""KD (Hinton et al. 2015): L_S = a*CE(z_S, y) + b*ST(z_S, z_T) from a frozen teacher."""

from __future__ import annotations

from pydantic import Field

from ray_kd.methods.base import Method, MethodParams
from ray_kd.methods.losses import cross_entropy


class KDParams(MethodParams):
    temperature: float = Field(4.0, gt=0)
    ce_weight: float = Field(0.1, ge=0)
    kd_weight: float = Field(0.9, ge=0)


class KD(Method):
    """Defaults are the RepDistiller/mdistiller CIFAR-100 protocol (T=4, a=0.1, b=0.9)."""

    name = "kd"
    Params = KDParams
    needs_teacher = True

    def loss(self, role, outputs, published, y):
        if role.is_teacher:
            return {}
        p = self.params
        z_s = outputs["logits"]
        return self.with_total({
            "ce": p.ce_weight * cross_entropy(z_s, y),
            "kd": p.kd_weight * self.distill(role, z_s, published["teacher"]["logits"], p.temperature),
        })
