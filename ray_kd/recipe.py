"""The training recipe of one role: optimiser, lr schedule, mixed precision, clipping, label smoothing.

Everything here is torch's own (SGD/AdamW, LinearLR/MultiStepLR/CosineAnnealingLR
in a SequentialLR, autocast, GradScaler, clip_grad_norm_); this module only picks
and wires them from `optim.*`. The schedule steps once per iteration, so
milestones and warmup given in epochs become steps through steps_per_epoch;
with the defaults (multistep, no warmup) every step of epoch e gets exactly the
lr the per-epoch MultiStepLR gave it before (milestone m -> step m * S, and
m * S <= t < (e + 1) * S holds exactly when m <= e).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn
from torch.optim import lr_scheduler

from ray_kd.config import OptimConfig
from ray_kd.errors import UserError
from ray_kd.methods.losses import smoothing


class RecipeError(UserError, ValueError):
    """An optim.* setting this machine or this checkpoint cannot run."""


def param_groups(module: nn.Module, trainable: list[nn.Parameter], weight_decay: float,
                 no_decay_norm_bias: bool) -> list[dict]:
    """The `trainable` parameters of `module`; with `no_decay_norm_bias`, the 1-d ones (every norm weight
    and bias, and all biases: timm's rule) in a second group with weight_decay 0."""
    wanted = {id(p) for p in trainable}
    named = [(n, p) for n, p in module.named_parameters() if id(p) in wanted]
    if not no_decay_norm_bias:
        return [{"params": [p for _, p in named], "weight_decay": weight_decay}] if named else []
    exempt = {n for n, p in named if p.ndim <= 1 or n.endswith(".bias")}
    groups = [{"params": [p for n, p in named if n not in exempt], "weight_decay": weight_decay},
              {"params": [p for n, p in named if n in exempt], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(module: nn.Module, trainable: list[nn.Parameter],
                    optim: OptimConfig) -> torch.optim.Optimizer | None:
    """SGD (momentum) or AdamW (torch's default betas and eps) over what trains; None when nothing does."""
    groups = param_groups(module, trainable, optim.weight_decay, optim.no_decay_norm_bias)
    if not groups:
        return None
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr)
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig,
                    steps_per_epoch: int) -> lr_scheduler.LRScheduler:
    """The per-iteration schedule: an optional LinearLR warmup, then MultiStepLR or CosineAnnealingLR
    (to 0 at the last step of the run), chained by SequentialLR.

    The main schedule starts counting at the end of the warmup (SequentialLR restarts it
    there), so multistep milestones are shifted by the warmup's steps.
    """
    total = optim.epochs * steps_per_epoch
    warmup = min(round(optim.warmup_epochs * steps_per_epoch), total - 1)  # a cosine needs a step to span
    if optim.schedule == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
    else:
        main = lr_scheduler.MultiStepLR(optimizer, [m * steps_per_epoch - warmup for m in optim.milestones],
                                        optim.gamma)
    if warmup == 0:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=optim.warmup_start_factor, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


class Recipe:
    """One role's optimiser, schedule and precision; `context()` wraps its forward and loss, `step(loss)`
    does backward, clipping, the optimiser and the schedule step."""

    def __init__(self, module: nn.Module, trainable: list[nn.Parameter], optim: OptimConfig, steps_per_epoch: int,
                 device: torch.device):
        self.optim, self.device = optim, device
        self.total_steps = optim.epochs * steps_per_epoch
        self.optimizer = build_optimizer(module, trainable, optim)
        self.scheduler = build_scheduler(self.optimizer, optim, steps_per_epoch) if self.optimizer else None
        self.scaler = torch.amp.GradScaler(device.type) if optim.amp == "fp16" and self.optimizer else None
        self._steps_per_epoch = steps_per_epoch
        self.sync_gradients: Callable[[list[torch.Tensor]], None] | None = None  # set by a replicated session

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def context(self) -> contextlib.AbstractContextManager:
        """Autocast at optim.amp (nothing when 'none') and CE label smoothing at optim.label_smoothing."""
        stack = contextlib.ExitStack()
        if self.optim.amp != "none":
            dtype = torch.bfloat16 if self.optim.amp == "bf16" else torch.float16
            stack.enter_context(torch.autocast(self.device.type, dtype=dtype))
        stack.enter_context(smoothing(self.optim.label_smoothing))
        return stack

    def step(self, loss: torch.Tensor) -> float | None:
        """One update; returns the gradient norm before clipping when clipping is on."""
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.sync_gradients is not None:  # data-parallel replicas: the global batch's gradient
            self.sync_gradients(self.params)
        norm = None
        if self.optim.clip_grad_norm is not None:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            norm = float(nn.utils.clip_grad_norm_(self.params, self.optim.clip_grad_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return norm

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "schedule_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        if not self.optimizer:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler = state["scheduler"]
        if "schedule_steps" not in state:  # written when MultiStepLR stepped per epoch: count in steps now
            scheduler = _epochs_to_steps(scheduler, self._steps_per_epoch)
        elif self.optim.schedule == "cosine" and state["schedule_steps"] != self.total_steps:
            raise RecipeError(f"this run's cosine schedule spans {state['schedule_steps']} steps but the config now "
                              f"gives {self.total_steps}; keep optim.epochs (and the data) as they were, or start "
                              "a new run name")
        self.scheduler.load_state_dict(scheduler)
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def _epochs_to_steps(state: dict, steps_per_epoch: int) -> dict:
    """A per-epoch MultiStepLR state as the per-step one that gives the same lr at every step."""
    from collections import Counter

    epochs = state["last_epoch"]
    return {**state, "milestones": Counter({m * steps_per_epoch: c for m, c in state["milestones"].items()}),
            "last_epoch": epochs * steps_per_epoch, "_step_count": epochs * steps_per_epoch + 1}

