"""Teacher-free KD (Yuan et al. 2020), the manually designed regulariser: a fixed per-class target, no teacher.

The "teacher" of a sample of class y is a fixed distribution q_y: `correct_prob` on
y, the rest spread evenly over the other classes. The student minimises
`(1 - alpha) * CE + alpha * T^2 * KL(softmax(log q_y / T) || softmax(z_S / T))`,
i.e. KD's loss with the teacher's logits replaced by log q_y (at T = 1 the target
is q_y itself). Defaults mirror this project's KD (T=4, a 0.1/0.9 split), so the
two differ only in where the soft target comes from. (Public re-implementations
differ here: some softmax the probabilities q_y as if they were logits, at T of
20-40, a far flatter target; this one keeps q_y's shape.) It is LW-KD's baseline:
cheap, but the same target for every instance of a class.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from ray_kd.methods.base import Method, MethodParams, RoleModule
from ray_kd.methods.losses import cross_entropy, soft_target
from ray_kd.methods.registry import register_method


class TFKDParams(MethodParams):
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1, description="(1 - alpha) * CE + alpha * ST")
    correct_prob: float = Field(0.9, gt=0, lt=1, description="the fixed target's probability on the true class")


def fixed_target_logits(y: torch.Tensor, num_classes: int, correct_prob: float) -> torch.Tensor:
    """log q_y for each label: log(correct_prob) on y, log((1 - correct_prob) / (K - 1)) elsewhere."""
    rest = math.log((1 - correct_prob) / max(num_classes - 1, 1))
    logits = torch.full((len(y), num_classes), rest, device=y.device)
    return logits.scatter_(1, y.view(-1, 1), math.log(correct_prob))


class TeacherFreeStudent(RoleModule):
    def loss(self, outputs, published, y, step):
        p, z = self.params, outputs["logits"]
        target = fixed_target_logits(y, z.shape[1], p.correct_prob)  # not received from a role: no distill hook
        return {"ce": (1 - p.alpha) * cross_entropy(z, y), "kd": p.alpha * soft_target(z, target, p.temperature)}


@register_method
class TFKD(Method):
    name = "tfkd"
    Params = TFKDParams

    def build_role(self, role, backbone, num_classes):
        return TeacherFreeStudent(role, backbone, self.params)
