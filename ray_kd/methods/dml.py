"""DML (Zhang et al. 2018): K peers from scratch, each learning from the labels and every other peer.

Peer k minimises CE(z_k, y) + 1/(K-1) * sum_{j != k} KL(p_j || p_k). With the
default T=1 this is the paper's loss; T > 1 gives the softened T^2-scaled form.
"""

from __future__ import annotations

from pydantic import Field

from ray_kd.methods.base import Method, MethodParams
from ray_kd.methods.losses import cross_entropy


class DMLParams(MethodParams):
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(1.0, ge=0)
    kd_weight: float = Field(1.0, ge=0)


class DML(Method):
    name = "dml"
    Params = DMLParams
    min_students = 2

    def loss(self, role, outputs, published, y):
        p = self.params
        z = outputs["logits"]
        peers = [out["logits"] for name, out in published.items() if name != role.name and name != "teacher"]
        mimicry = sum(self.distill(role, z, z_peer, p.temperature) for z_peer in peers) / len(peers)
        return self.with_total({"ce": p.ce_weight * cross_entropy(z, y), "kd": p.kd_weight * mimicry})
