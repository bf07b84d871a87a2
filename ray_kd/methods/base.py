"""What a distillation method is: pure tensor code, no Ray.

A method names the roles it needs, builds the extra modules each role owns
(a bridge, a simplifier, auxiliary heads...), says what each role publishes to
the others every step, and computes one role's loss from its own outputs and
everyone's published outputs. The executors (single-process or Ray) call these
hooks in lockstep; because a method never sees how the outputs travelled, the
same code runs unchanged under both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ray_kd.methods.losses import soft_target
from ray_kd.models import StagedNet

Outputs = dict[str, torch.Tensor]
"""A role's tensors from one forward pass, by name (e.g. 'logits')."""


@dataclass(frozen=True)
class Role:
    """One participant: `teacher` or `student_<k>`. Rank r of a worker group runs role r."""

    name: str
    model: str
    checkpoint: str | None = None

    @property
    def is_teacher(self) -> bool:
        return self.name == "teacher"


class MethodParams(BaseModel):
    """Hyper-parameters of a method; each method subclasses this with its own fields."""

    model_config = ConfigDict(extra="forbid")


class RoleNet(nn.Module):
    """Everything one role owns: its backbone and the method's extra modules."""

    def __init__(self, backbone: StagedNet, extras: dict[str, nn.Module] | None = None):
        super().__init__()
        self.backbone = backbone
        self.extras = nn.ModuleDict(extras or {})


class Method:
    """Base class. Subclasses set `name`, `Params`, `needs_teacher` and override `loss`."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    needs_teacher: ClassVar[bool] = False
    min_students: ClassVar[int] = 1

    def __init__(self, params: MethodParams):
        self.params = params

    # --- building a role -------------------------------------------------
    def extras(self, role: Role, backbone: StagedNet, num_classes: int) -> dict[str, nn.Module]:
        """Extra trainable modules this role owns (none by default)."""
        return {}

    def input_channels(self, role: Role, data_channels: int) -> int:
        """Channels of the images this role's backbone eats (a teacher fed other inputs may differ)."""
        return data_channels

    def check_roles(self, roles: list[Role], num_classes: int, in_channels: int) -> None:
        """Raise ValueError (naming the pair and the fix) when this method cannot run these models."""

    def backbone_frozen(self, role: Role) -> bool:
        """A pretrained teacher is frozen by default; students always train."""
        return role.is_teacher

    def set_train_mode(self, role: Role, net: RoleNet) -> None:
        """Train mode for what trains, eval mode for a frozen backbone (its BN stats stay put)."""
        net.train()
        if self.backbone_frozen(role):
            net.backbone.eval()

    # --- one step ---------------------------------------------------------
    def forward(self, role: Role, net: RoleNet, x: torch.Tensor, y: torch.Tensor) -> Outputs:
        logits, _ = net.backbone(x)
        return {"logits": logits}

    def publish(self, role: Role, outputs: Outputs) -> Outputs:
        """What this role sends to every other role this step (detached, small)."""
        return {"logits": outputs["logits"].detach()}

    def loss(self, role: Role, outputs: Outputs, published: dict[str, Outputs], y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms of `role` (each a scalar, weights applied, summed into 'total').

        `published` maps every role name (this one included) to what it published.
        A role with nothing to train returns {}.
        """
        raise NotImplementedError

    def distill(self, role: Role, z_learner: torch.Tensor, z_target: torch.Tensor,
                temperature: float) -> torch.Tensor:
        """ST(z_learner, z_target) for a role learning from logits another role published.

        Methods route every received soft target through this one hook, so a
        wrapper (SKD) can reshape the target before the loss without knowing
        the method.
        """
        return soft_target(z_learner, z_target, temperature)

    def eval_heads(self, role: Role, outputs: Outputs) -> dict[str, torch.Tensor]:
        """Logits to score at evaluation, by label: the role's own, plus e.g. a bridge's."""
        return {role.name: outputs["logits"]}

    # --- helpers for subclasses --------------------------------------------
    @staticmethod
    def with_total(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**terms, "total": sum(terms.values())}
