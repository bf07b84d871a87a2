"""MTKD-SSR (Gou et al. 2023): stage-wise channel and response distillation plus the student's cross-stage self-review.

Verified (abstract only): three targets, stage by stage. SCD distils channel
features, SRD logits at every stage, and CRD has the student self-distil its own
stage responses (self-reflection); the teacher's ability to "unfold" its
knowledge is enhanced. Inferred, each a setting:
- every stage of teacher and student gets an auxiliary head, conv3x3 (`head_width`
  channels; None = the stage's) -> BN -> ReLU -> GAP -> FC. The teacher's backbone
  stays frozen and its heads train with CE alone, on the teacher's worker (the
  teacher role trains its heads only). Student heads train with `head_ce_weight` * CE;
- SCD: per paired stage, `scd_temperature`^2 * KL between the softmax over channels of
  the teacher's channel descriptor (GAP over space, B x C_t) and of the student's,
  widened to C_t by a 1x1-conv adapter on the student's side;
- SRD: ST (`temperature`) from teacher head i into student head i, and (`srd_final`)
  from the teacher's final logits into the student's; by default the final pair is one
  more term of SRD's mean (1/4 of `srd_weight` with 3 stages); `srd_final_weight` gives
  it a weight of its own (term `srd_final`), so that ce_weight 0.1, srd_final_weight 0.9
  and every other weight 0 is exactly KD's loss;
- CRD: ST from each deeper student head, and from the student's final logits, into
  every shallower head; on the student's own worker (nothing crosses for it);
- each term is a mean over its stages (or pairs), so a weight means the same for
  3- and 4-stage nets; a weight of 0 turns its term off (not computed, not logged);
- `stage_alignment`: `strict` pairs stage i with stage i and needs equal stage counts
  (CIFAR ResNets, WRNs, ShuffleNets: 3; VGGs, MobileNetV2: 4); `deepest` pairs a
  shallower student's stages with the teacher's last ones (digits_cnn_l -> digits_cnn_s).
What crosses workers per step: the teacher's final and per-stage logits and its
per-stage channel descriptors (B x C_i), never feature maps; the student sends its
logits only. Evaluation scores the final logits only (heads are training aids).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from ray_kd.methods.base import Method, MethodParams, RoleModule
from ray_kd.methods.losses import cross_entropy, soft_target
from ray_kd.methods.registry import register_method
from ray_kd.models import create_model
from ray_kd.models.base import ClassifierHead
from ray_kd.models.external import require_stages, role_field
from ray_kd.models.layers import conv_bn, init_weights


class MTKDParams(MethodParams):
    temperature: float = Field(4.0, gt=0, description="SRD and CRD soft-target temperature")
    ce_weight: float = Field(1.0, ge=0, description="CE of the student's final logits")
    head_ce_weight: float = Field(1.0, ge=0, description="CE of each student stage head")
    scd_weight: float = Field(1.0, ge=0)
    scd_temperature: float = Field(1.0, gt=0, description="softmax temperature over channel descriptors")
    srd_weight: float = Field(1.0, ge=0)
    srd_final: bool = Field(True, description="SRD also pairs the final logits (the last stage's response)")
    srd_final_weight: float | None = Field(
        None, ge=0, description="weight of the final-logit pair as a term of its own; None = one of SRD's pairs")
    crd_weight: float = Field(1.0, ge=0)
    head_width: int | None = Field(None, gt=0, description="channels of each head's conv; None = the stage's")
    stage_alignment: Literal["strict", "deepest"] = "strict"


def stage_head(channels: int, num_classes: int, width: int) -> nn.Module:
    """conv3x3 -> BN -> ReLU -> GAP -> FC: one stage's map to class logits."""
    head = nn.Sequential(conv_bn(channels, width), ClassifierHead(width, num_classes))
    init_weights(head)
    return head


class ChannelAdapter(LazyModuleMixin, nn.Module):
    """Student stage width -> teacher stage width for SCD: a 1x1 conv, run after GAP (the same linear map).

    The teacher's width first shows when its descriptors arrive, so the weights
    are built then (LazyModuleMixin also rebuilds them from a checkpoint) and
    start at zero: no random draw, so both executors agree, and SCD first fits
    the adapter before it pushes on the student.
    """

    def __init__(self):
        super().__init__()
        self.weight, self.bias = UninitializedParameter(), UninitializedParameter()

    def initialize_parameters(self, x: torch.Tensor, width: int) -> None:
        if not self.has_uninitialized_params():  # already loaded from a checkpoint
            return
        with torch.no_grad():
            self.weight.materialize((width, x.shape[1]), device=x.device, dtype=x.dtype)
            self.bias.materialize((width,), device=x.device, dtype=x.dtype)
            self.weight.zero_()
            self.bias.zero_()

    def forward(self, x: torch.Tensor, width: int) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _stage_count(role, num_classes: int, in_channels: int) -> int:
    net = create_model(role.model, num_classes, in_channels, **role.model_options)
    return len(require_stages("mtkd_ssr", role, net, role_field(role)).channels)


def stage_heads(backbone: nn.Module, num_classes: int, width: int | None) -> nn.ModuleList:
    return nn.ModuleList(stage_head(c, num_classes, width or c) for c in backbone.stage_channels)


def staged_outputs(backbone: nn.Module, heads: nn.ModuleList, x: torch.Tensor, training: bool) -> dict:
    """Final logits; in training also every stage head's logits and channel descriptor (GAP of the map)."""
    logits, features = backbone(x)
    outputs = {"logits": logits}
    if not training:  # evaluation scores the final logits only
        return outputs
    for i, (feature, head) in enumerate(zip(features, heads)):
        outputs[f"head{i}"] = head(feature)
        outputs[f"channels{i}"] = feature.mean(dim=(2, 3))
    return outputs


class HeadedTeacher(RoleModule):
    """The frozen teacher with a head on every stage, trained with CE alone; publishes all heads and descriptors."""

    def __init__(self, role, backbone, params: MTKDParams, num_classes: int):
        super().__init__(role, backbone, frozen_backbone=True)
        self.extras["heads"] = stage_heads(backbone, num_classes, params.head_width)

    def forward(self, x, y):
        return staged_outputs(self.backbone, self.extras["heads"], x, self.training)

    def publish(self, outputs):
        return {name: t.detach() for name, t in outputs.items()}

    def loss(self, outputs, published, y, step):
        heads = [outputs[f"head{i}"] for i in range(len(self.extras["heads"]))]
        return {"head_ce": _mean(cross_entropy(h, y) for h in heads)}


class SelfReviewingStudent(RoleModule):
    """A student with stage heads (and SCD's channel adapters) learning from the teacher's stages and its own."""

    def __init__(self, role, backbone, params: MTKDParams, num_classes: int):
        super().__init__(role, backbone, params)
        self.extras["heads"] = stage_heads(backbone, num_classes, params.head_width)
        if params.scd_weight:  # an adapter SCD never runs would stay unbuilt in the checkpoint
            self.extras["adapters"] = nn.ModuleList(ChannelAdapter() for _ in backbone.stage_channels)

    def forward(self, x, y):
        return staged_outputs(self.backbone, self.extras["heads"], x, self.training)

    def loss(self, outputs, published, y, step):
        p, teacher, z = self.params, published["teacher"], outputs["logits"]
        heads = [outputs[f"head{i}"] for i in range(len(self.extras["heads"]))]
        offset = _count(teacher, "channels") - len(heads)  # > 0 only under stage_alignment=deepest
        terms = {"ce": p.ce_weight * cross_entropy(z, y)}
        if p.head_ce_weight:
            terms["head_ce"] = p.head_ce_weight * _mean(cross_entropy(h, y) for h in heads)
        if p.scd_weight:
            scd = []
            for i, adapter in enumerate(self.extras["adapters"]):
                target = teacher[f"channels{i + offset}"]
                scd.append(soft_target(adapter(outputs[f"channels{i}"], target.shape[1]), target, p.scd_temperature))
            terms["scd"] = p.scd_weight * _mean(scd)
        final_apart = p.srd_final_weight is not None
        if p.srd_weight:
            pairs = [(h, teacher[f"head{i + offset}"]) for i, h in enumerate(heads)]
            pairs += [(z, teacher["logits"])] if p.srd_final and not final_apart else []
            terms["srd"] = p.srd_weight * _mean(self.distill(s, t, p.temperature) for s, t in pairs)
        if final_apart and p.srd_final and p.srd_final_weight:
            terms["srd_final"] = p.srd_final_weight * self.distill(z, teacher["logits"], p.temperature)
        if p.crd_weight:
            chain = heads + [z]
            terms["crd"] = p.crd_weight * _mean(
                _mean(soft_target(chain[i], deeper, p.temperature) for deeper in chain[i + 1:])
                for i in range(len(heads)))
        return terms


@register_method
class MTKDSSR(Method):
    name = "mtkd_ssr"
    Params = MTKDParams
    needs_teacher = True

    def check_roles(self, roles, num_classes, in_channels):
        teacher = next(r for r in roles if r.is_teacher)
        n_t = _stage_count(teacher, num_classes, self.input_channels(teacher, in_channels))
        for role in roles:
            if role.is_teacher:
                continue
            n_s = _stage_count(role, num_classes, self.input_channels(role, in_channels))
            pair = f"teacher {teacher.model} has {n_t} stages and {role.name} {role.model} has {n_s}"
            if self.params.stage_alignment == "strict" and n_s != n_t:
                raise ValueError(
                    f"mtkd_ssr pairs stages one to one, but {pair}; pick a {n_t}-stage student (CIFAR ResNets, "
                    "WRNs and ShuffleNets have 3 stages, VGGs and MobileNetV2 4), or set "
                    "method.stage_alignment=deepest to pair the student's stages with the teacher's last ones")
            if n_s > n_t:
                raise ValueError(f"mtkd_ssr cannot map a deeper student onto a shallower teacher: {pair}; "
                                 f"pick a student with at most {n_t} stages")

    def build_role(self, role, backbone, num_classes):
        if role.is_teacher:
            return HeadedTeacher(role, backbone, self.params, num_classes)
        return SelfReviewingStudent(role, backbone, self.params, num_classes)


def _count(outputs: dict, prefix: str) -> int:
    return sum(1 for name in outputs if name.startswith(prefix))


def _mean(values) -> torch.Tensor:
    values = list(values)
    return sum(values) / len(values)
