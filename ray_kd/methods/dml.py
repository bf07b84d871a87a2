"""DML (Zhang et al. 2018): K peers from scratch, each learning from the labels and every other peer.

Peer k minimises CE(z_k, y) + 1/(K-1) * sum_{j != k} KL(p_j || p_k). With the
default T=1 this is the paper's loss; T > 1 gives the softened T^2-scaled form.
"""

from __future__ import annotations

from pydantic import Field

from ray_kd.methods.base import Method, MethodParams, RoleModule
from ray_kd.methods.losses import cross_entropy
from ray_kd.methods.registry import register_method


class DMLParams(MethodParams):
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(1.0, ge=0)
    kd_weight: float = Field(1.0, ge=0)


class Peer(RoleModule):
    def loss(self, outputs, published, y, step):
        p, z = self.params, outputs["logits"]
        peers = [out["logits"] for name, out in published.items() if name not in (self.role.name, "teacher")]
        mimicry = sum(self.distill(z, z_peer, p.temperature) for z_peer in peers) / len(peers)
        return {"ce": p.ce_weight * cross_entropy(z, y), "kd": p.kd_weight * mimicry}


@register_method
class DML(Method):
    name = "dml"
    Params = DMLParams
    min_students = 2

    def build_role(self, role, backbone, num_classes):
        return Peer(role, backbone, self.params)
