"""One role's module, optimiser and step, wherever it runs (a Ray worker, or beside the others).

The method decides what the role computes (its `RoleModule`); a `RoleRunner`
does what every role shares: seeded construction, loading the backbone's
weights, the optimiser over what trains, the step, evaluation, checkpoints.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from ray_kd.config import OptimConfig, RunConfig
from ray_kd.data import Dataset, eval_batches
from ray_kd.errors import UserError
from ray_kd.methods import Method, Outputs, Role, Step
from ray_kd.models.folding import fold_batchnorm
from ray_kd.recipe import Recipe
from ray_kd.weights import load_backbone


def all_roles(cfg: RunConfig) -> list[Role]:
    """Rank order: the teacher (if any) first, then student_0, student_1, ..."""
    def role(name, spec):
        stages = None if spec.stages is None else tuple(spec.stages)
        return Role(name, spec.model, spec.checkpoint, spec.model_kwargs, stages, spec.replace_head, spec.pretrained)

    roles = [role("teacher", cfg.teacher)] if cfg.teacher else []
    return roles + [role(f"student_{k}", s) for k, s in enumerate(cfg.students)]


class NonFiniteLossError(UserError, RuntimeError):
    """A loss term became NaN or inf: training stops rather than corrupting the weights."""


class RoleRunner:
    """Builds a role (its backbone, then the method's module around it, the optimiser over what trains) and steps it."""

    def __init__(self, role: Role, index: int, method: Method, dataset: Dataset, optim: OptimConfig,
                 seed: int, device: torch.device, steps_per_epoch: int, channels_last: bool = False,
                 fold_frozen_batchnorm: bool = False):
        self.role, self.device = role, device
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        torch.manual_seed(seed * 1000 + index)  # same init in every executor
        channels = method.input_channels(role, dataset.in_channels)
        backbone = load_backbone(role, dataset.num_classes, channels)
        self.net = method.build_role(role, backbone, dataset.num_classes).to(device)
        self._lay_out_convs(self.net)
        # A frozen backbone that stays in eval mode runs with its BatchNorm folded into its convs
        # (`runtime.fold_frozen_batchnorm`); checkpoints keep it as loaded, so they read the same either way.
        self.loaded_backbone = copy.deepcopy(self.net.backbone).cpu() \
            if fold_frozen_batchnorm and self._frozen_in_eval() else None
        if self.loaded_backbone is not None:
            self._fold_backbone()
        self.recipe = Recipe(self.net, self.net.trainable_parameters(), optim, steps_per_epoch, device)
        self.optimizer, self.scheduler = self.recipe.optimizer, self.recipe.scheduler
        self.step = 0

    def _frozen_in_eval(self) -> bool:
        """The backbone gets no gradient and stays in eval mode while the role trains."""
        self.net.train()
        backbone = self.net.backbone
        return not any(p.requires_grad for p in backbone.parameters()) and not any(m.training for m in backbone.modules())

    def _fold_backbone(self) -> None:
        """The backbone that runs: the loaded one, copied, with its BatchNorm folded."""
        backbone = copy.deepcopy(self.loaded_backbone).eval()
        fold_batchnorm(backbone)
        self.net.backbone = backbone.to(self.device)
        self._lay_out_convs(self.net.backbone)

    def _lay_out_convs(self, module: nn.Module) -> None:
        for p in module.parameters():  # conv weights; a lazy module's are left as they come (not built yet)
            if not isinstance(p, nn.parameter.UninitializedParameter) and p.dim() == 4:
                p.data = p.data.contiguous(memory_format=self.layout)

    @property
    def trains(self) -> bool:
        return self.optimizer is not None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[Outputs, Outputs]:
        """This step's outputs, and the part of them the role publishes."""
        self.net.train()
        with torch.set_grad_enabled(self.trains), self.recipe.context():
            outputs = self.net(self.laid_out(x), y)
        return outputs, self.net.publish(outputs)

    def update(self, outputs: Outputs, published: dict[str, Outputs], y: torch.Tensor, epoch: int) -> dict[str, float]:
        """One optimiser step on this role's loss; returns its terms as floats."""
        step = Step(self.step, epoch)
        self.step += 1
        if not self.trains:
            return {}
        with self.recipe.context():
            terms = self.net.losses(outputs, published, y, step)
        values = {name: float(t.detach()) for name, t in terms.items()}
        for name, value in values.items():
            if not math.isfinite(value):
                raise NonFiniteLossError(f"role {self.role.name}: loss term {name!r} is {value} at step "
                                         f"{self.step}; lower optim.lr or the loss weights")
        self.recipe.step(terms["total"])  # the schedule steps per iteration too
        return values

    @staticmethod
    def _with_backbone(net_state: dict, backbone: nn.Module | None) -> dict:
        """`net_state` with its backbone's entries taken from `backbone` (None: left as they are)."""
        if backbone is None:
            return net_state
        rest = {k: v for k, v in net_state.items() if not k.startswith("backbone.")}
        return {**rest, **{f"backbone.{k}": v for k, v in backbone.state_dict().items()}}

    def laid_out(self, x: torch.Tensor) -> torch.Tensor:
        """An image batch in the memory layout of the role's conv weights (`runtime.channels_last`)."""
        return x.contiguous(memory_format=self.layout) if x.dim() == 4 else x

    def evaluate(self, dataset: Dataset, splits: tuple[str, ...] = ("val", "test"),
                 progress: Callable[[str, int, int], None] | None = None) -> dict[str, float]:
        """Top-1 of each of the role's heads on the splits, e.g. {'student_0/val_acc': 91.2}; `progress(split,
        images done, images)` after each batch."""
        metrics = {}
        for split_name in splits:
            split = getattr(dataset, split_name)
            correct: dict[str, int] = {}
            done = 0
            for x, y in eval_batches(split, dataset):
                for head, n in self.correct(x, y).items():
                    correct[head] = correct.get(head, 0) + n
                done += len(y)
                if progress is not None:
                    progress(split_name, done, len(split.labels))
            for head, n in correct.items():
                metrics[f"{head}/{split_name}_acc"] = 100.0 * n / len(split.labels)
        return metrics

    @torch.no_grad()
    def correct(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
        """How many of the batch each head gets right, in eval mode."""
        self.net.eval()
        x, y = x.to(self.device), y.to(self.device)
        with self.recipe.context():
            outputs = self.net(self.laid_out(x), y)
        return {head: int((logits.argmax(1) == y).sum()) for head, logits in self.net.eval_heads(outputs).items()}

    def state_dict(self) -> dict:
        return {"net": self._with_backbone(self.net.state_dict(), self.loaded_backbone), "step": self.step,
                **self.recipe.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        net = state["net"]
        if self.loaded_backbone is not None:  # the checkpoint's backbone, folded again
            self.loaded_backbone.load_state_dict({k[len("backbone."):]: v for k, v in net.items()
                                                  if k.startswith("backbone.")})
            self._fold_backbone()
            net = self._with_backbone(net, self.net.backbone)
        self.net.load_state_dict(net)
        self.step = state["step"]
        self.recipe.load_state_dict(state)
