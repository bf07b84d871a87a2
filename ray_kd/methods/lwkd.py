"""LW-KD (Liu et al. 2020): KD from a lightweight teacher trained on synthesized digits, plus an adversarial loss.

Verified (abstract only): a lightweight teacher is trained on a synthesized simple
dataset with as many classes as the target; its soft targets guide the student
through KD loss plus an adversarial loss that makes the student's outputs
indistinguishable from the teacher's. Inferred, each a setting:
- the synthesized set is `ray_kd.synthetic` (digit glyphs, K classes) and the teacher
  any small zoo net trained on it with `ray-kd train-teacher` and
  `data: {dataset: synthetic, synthetic: {classes: K, size: S}}`, S the target's image size
  (`synthetic_size`, None = the target's); it eats `synthetic.CHANNELS` (1) channels;
- the teacher never sees the target images: for a sample of label y its soft target
  is its output on a fresh synthesized sample of class y, drawn for that instance on
  the teacher's worker from a generator seeded by the role's init and the step count
  (so both executors draw the same pixels, and a resumed run draws on);
- student loss `(1 - alpha) * CE + alpha * ST(z_S, z_T) + adv_weight * L_adv`, with
  `L_adv = BCE(D(p_S), 1)` (the non-saturating form) and `p = softmax(z / adv_temperature)`;
- the discriminator D (Linear -> LeakyReLU -> Linear on probability vectors, `disc_hidden`
  wide) lives with its student and learns `disc_weight * (BCE(D(p_T), 1) + BCE(D(p_S), 0)) / 2`
  in the same step. One optimiser and one backward serve both, the single-backward
  equivalent of a gradient-reversal layer: D learns from p_S detached, and L_adv runs
  p_S through D with its weights detached, so each loss moves only its own side.
  `adv_weight: 0` turns the adversarial part (and D's training) off: plain KD from the
  lightweight teacher.
At evaluation the teacher has nothing to score (it never sees target images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from ray_kd import synthetic
from ray_kd.methods.base import Method, MethodParams, RoleModule
from ray_kd.methods.losses import cross_entropy
from ray_kd.methods.registry import register_method


class LWKDParams(MethodParams):
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1, description="(1 - alpha) * CE + alpha * ST")
    adv_weight: float = Field(0.1, ge=0, description="weight of the student's adversarial loss; 0 = off")
    adv_temperature: float = Field(1.0, gt=0, description="softmax temperature of what the discriminator sees")
    disc_weight: float = Field(1.0, ge=0, description="weight of the discriminator's own BCE")
    disc_hidden: int = Field(64, gt=0)
    synthetic_size: int | None = Field(None, ge=4, description="side of the teacher's synthesized inputs; "
                                                               "None = the target images' side")


class SyntheticDraws(nn.Module):
    """The teacher's inputs: a fresh synthesized sample of each label, one seeded draw per training step.

    The seed and step count are buffers, saved with the role's checkpoint.
    """

    def __init__(self, num_classes: int, seed: int):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("draws", torch.tensor(0, dtype=torch.int64))

    def forward(self, labels: torch.Tensor, size: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(self.draws))
        self.draws += 1
        images = synthetic.render(labels, self.num_classes, size, generator)
        return synthetic.normalize(images).to(labels.device)


def discriminator(num_classes: int, hidden: int) -> nn.Module:
    """Probability vector -> one logit: 'this came from the teacher'."""
    return nn.Sequential(nn.Linear(num_classes, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


class GlyphTeacher(RoleModule):
    """The frozen lightweight teacher: for each label, its logits on a fresh synthesized sample of that class."""

    def __init__(self, role, backbone, params: LWKDParams, num_classes: int):
        super().__init__(role, backbone, params, frozen_backbone=True)
        # the seed comes from the role's seeded init: the same in every executor
        self.extras["draws"] = SyntheticDraws(num_classes, int(torch.randint(2**31 - 1, ())))

    def forward(self, x, y):
        if not self.training:  # evaluation: the teacher has no target images to score
            return {}
        logits, _ = self.backbone(self.extras["draws"](y, self.params.synthetic_size or x.shape[-1]))
        return {"logits": logits}

    def eval_heads(self, outputs):
        return {}


class AdversarialStudent(RoleModule):
    """KD from the glyph teacher, plus a discriminator (owned here) that tells the two output distributions apart."""

    def __init__(self, role, backbone, params: LWKDParams, num_classes: int):
        super().__init__(role, backbone, params)
        self.extras["discriminator"] = discriminator(num_classes, params.disc_hidden)

    def loss(self, outputs, published, y, step):
        p, z, z_t = self.params, outputs["logits"], published["teacher"]["logits"]
        terms = {"ce": (1 - p.alpha) * cross_entropy(z, y), "kd": p.alpha * self.distill(z, z_t, p.temperature)}
        if p.adv_weight:
            d = self.extras["discriminator"]
            p_s, p_t = F.softmax(z / p.adv_temperature, dim=1), F.softmax(z_t.detach() / p.adv_temperature, dim=1)
            frozen = {name: w.detach() for name, w in d.named_parameters()}
            terms["adv"] = p.adv_weight * _bce(functional_call(d, frozen, (p_s,)), 1.0)
            terms["disc"] = p.disc_weight * (_bce(d(p_t), 1.0) + _bce(d(p_s.detach()), 0.0)) / 2
        return terms


@register_method
class LWKD(Method):
    name = "lwkd"
    Params = LWKDParams
    needs_teacher = True

    def input_channels(self, role, data_channels):
        return synthetic.CHANNELS if role.is_teacher else data_channels

    def build_role(self, role, backbone, num_classes):
        if role.is_teacher:
            return GlyphTeacher(role, backbone, self.params, num_classes)
        return AdversarialStudent(role, backbone, self.params, num_classes)
