"""The loss pieces every method reuses."""

from __future__ import annotations

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


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)
