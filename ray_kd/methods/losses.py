"""The loss pieces every method reuses."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def soft_target(z_learner: torch.Tensor, z_target: torch.Tensor, temperature: float) -> torch.Tensor:
    """ST(z_learner, z_target) = T^2 * KL(softmax(z_target/T) || softmax(z_learner/T)), batch mean.

    The target is detached: a learner never pushes its teacher through this term.
    """
    log_p_learner = F.log_softmax(z_learner / temperature, dim=1)
    log_p_target = F.log_softmax(z_target.detach() / temperature, dim=1)
    kl = F.kl_div(log_p_learner, log_p_target, reduction="batchmean", log_target=True)
    return kl * temperature**2


_LABEL_SMOOTHING = contextvars.ContextVar("label_smoothing", default=0.0)


@contextlib.contextmanager
def smoothing(label_smoothing: float) -> Iterator[None]:
    """Every `cross_entropy` inside uses this label smoothing (the running role's optim.label_smoothing):
    methods keep calling `cross_entropy(z, y)` and need not thread the setting through."""
    token = _LABEL_SMOOTHING.set(label_smoothing)
    try:
        yield
    finally:
        _LABEL_SMOOTHING.reset(token)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float | None = None) -> torch.Tensor:
    """CE on labels; `label_smoothing` None takes the value `smoothing(...)` set (0 outside it)."""
    eps = _LABEL_SMOOTHING.get() if label_smoothing is None else label_smoothing
    return F.cross_entropy(logits, labels, label_smoothing=eps)
