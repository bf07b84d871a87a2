"""What a distillation method is: pure tensor code, no Ray.

A `Method` holds class-level facts only: its validated params, the roles it
needs, which model pairs it can map, and, for each role, which `RoleModule` to
build. A `RoleModule` is the `nn.Module` one role runs: it owns the role's
backbone and the method's extra modules for it (a bridge, a simplifier,
auxiliary heads, a discriminator...), and computes the role's forward pass,
what it publishes to the others every step, its loss from its own outputs and
everyone's published outputs, and the heads scored at evaluation. The
executors (single-process or Ray) call these in lockstep; because a role never
sees how the outputs travelled, the same code runs unchanged under both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ray_kd.methods.losses import soft_target

Outputs = dict[str, torch.Tensor]
"""A role's tensors from one forward pass, by name (e.g. 'logits')."""

Terms = dict[str, torch.Tensor]
"""Loss terms of one role, each a weighted scalar, by name (e.g. 'ce', 'kd')."""


@dataclass(frozen=True)
class Role:
    """One participant: `teacher` or `student_<k>`. Rank r of a worker group runs role r."""

    name: str
    model: str
    checkpoint: str | None = None
    model_kwargs: dict = field(default_factory=dict, hash=False)  # external models only (config.RoleConfig)
    stages: tuple[str, ...] | None = None
    replace_head: bool = False
    pretrained: bool = False  # the library's hub weights (ray_kd.hub_weights), when no checkpoint

    @property
    def is_teacher(self) -> bool:
        return self.name == "teacher"

    @property
    def model_options(self) -> dict:
        """What `create_model` takes beside the name."""
        return {"model_kwargs": self.model_kwargs, "stages": self.stages}


@dataclass(frozen=True)
class Step:
    """Where training stands when a loss is computed (0-based), so a loss can warm up or anneal."""

    step: int = 0
    epoch: int = 0


class MethodParams(BaseModel):
    """Hyper-parameters of a method; each method subclasses this with its own fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # temperature=inf is an error, not a NaN run


class RoleModule(nn.Module):
    """One role: its backbone, the method's extras for it, and what it computes each step.

    The defaults describe a role that scores its backbone's logits, publishes
    them, and has no loss of its own (a frozen teacher). A frozen backbone gets
    no gradient and stays in eval mode when the module is put in train mode, so
    its BatchNorm statistics never move (mdistiller's Distiller keeps its
    teacher the same way). Subclasses override `forward`, `publish`, `loss`
    and `eval_heads`; whatever they put in `extras` trains with the role.
    """

    def __init__(self, role: Role, backbone: nn.Module, params: MethodParams | None = None,
                 frozen_backbone: bool = False):
        super().__init__()
        self.role, self.params = role, params
        self.backbone = backbone
        self.extras = nn.ModuleDict()
        self.frozen_backbone = frozen_backbone
        if frozen_backbone:
            backbone.requires_grad_(False)
        # Extension points for wrappers such as SKD (plain callables, not submodules):
        self.soft_target: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = soft_target
        self.extra_terms: list[Callable[[torch.Tensor], Terms]] = []

    def train(self, mode: bool = True) -> "RoleModule":
        super().train(mode)
        if mode and self.frozen_backbone:
            self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # --- what a method's role overrides -------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Outputs:
        logits, _ = self.backbone(x)
        return {"logits": logits}

    def publish(self, outputs: Outputs) -> Outputs:
        """What this role sends to every other role this step (detached, small)."""
        return {"logits": outputs["logits"].detach()}

    def loss(self, outputs: Outputs, published: dict[str, Outputs], y: torch.Tensor, step: Step) -> Terms:
        """This role's weighted loss terms; `published` maps every role name (this one included) to
        what it published. A role with nothing to train returns {}."""
        return {}

    def eval_heads(self, outputs: Outputs) -> dict[str, torch.Tensor]:
        """Logits to score at evaluation, by label: the role's own, plus e.g. a bridge's."""
        return {self.role.name: outputs["logits"]}

    # --- what the executors and the methods call ------------------------------
    def distill(self, z_learner: torch.Tensor, z_target: torch.Tensor, temperature: float) -> torch.Tensor:
        """ST(z_learner, z_target) for a soft target this role received from another role.

        Every received soft target goes through this one hook, so a wrapper (SKD)
        can reshape targets by replacing `soft_target` without knowing the method.
        """
        return self.soft_target(z_learner, z_target, temperature)

    def losses(self, outputs: Outputs, published: dict[str, Outputs], y: torch.Tensor, step: Step) -> Terms:
        """`loss` plus any wrapper's extra terms, and their sum as 'total' ({} when nothing trains)."""
        terms = self.loss(outputs, published, y, step)
        for extra in self.extra_terms:
            terms.update(extra(y))
        return {**terms, "total": sum(terms.values())} if terms else {}


class FrozenTeacher(RoleModule):
    """A pretrained teacher that only publishes its logits: frozen, nothing to train."""

    def __init__(self, role: Role, backbone: nn.Module):
        super().__init__(role, backbone, frozen_backbone=True)


class Method:
    """Base class. Subclasses set `name`, `Params`, `needs_teacher`, `min_students` and build their roles."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    needs_teacher: ClassVar[bool] = False
    min_students: ClassVar[int] = 1

    def __init__(self, params: MethodParams):
        self.params = params

    def build_role(self, role: Role, backbone: nn.Module, num_classes: int) -> RoleModule:
        """The module `role` runs, around its (already loaded) backbone."""
        raise NotImplementedError

    def input_channels(self, role: Role, data_channels: int) -> int:
        """Channels of the images this role's backbone eats (a teacher fed other inputs may differ)."""
        return data_channels

    def check_roles(self, roles: list[Role], num_classes: int, in_channels: int) -> None:
        """Raise ValueError (naming the pair and the fix) when this method cannot run these models."""
