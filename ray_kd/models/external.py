"""Models from torchvision, timm or any factory, made to behave like a `StagedNet`.

A role's `model` may be `torchvision:<name>`, `timm:<name>` or `package.module:factory`
(any callable returning an `nn.Module`). `ExternalNet` wraps what the library builds
and returns `(logits, [stage feature maps])` like the built-in zoo, so every method
runs on it. The stage maps are the outputs of named submodules, captured by forward
hooks; the names come from, in order of preference:

- the role's `stages` list (config), e.g. `[layer1, layer2, layer3, layer4]`;
- timm's feature interface (`model.feature_info`: the modules timm itself returns for
  `features_only`), keeping reductions >= 4 (the stem is not a stage, as in the zoo);
- for torchvision, which declares no stages, the last top-level block before each
  downsampling, read off one probe forward (the rule torchvision's detection backbones
  apply by hand: resnet -> layer1..layer4);
- none: the model is logits-only (`stage_channels == []`) and feature methods refuse it
  at preflight, naming the `stages` field to set.

Models are built without weights (torchvision `weights=None`, timm `pretrained=False`); a role's
weights are loaded onto them afterwards, from a file (`ray_kd.weights`) or from the library's hub
cache (`pretrained: true`, `ray_kd.hub_weights`).
"""

from __future__ import annotations

import importlib
import inspect
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ray_kd.plugins import check_allowed

PROBE_SIZES = (64, 224, 32, 8)
"""Square probe inputs tried in turn to read stage shapes: cheap for ImageNet models, their native
size for those fixed to it (ViTs), then the small datasets' (CIFAR, digits)."""

RESERVED_KWARGS = ("num_classes", "in_chans", "in_channels", "pretrained", "weights")
"""Builder arguments ray-kd sets itself (from the data; weights through `ray_kd.weights`)."""


def is_external(name: str) -> bool:
    return ":" in name


FACTORY_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def check_name(name: str) -> None:
    """Raise ValueError (one line) unless `name` is a torchvision/timm model or a well-formed, allowed
    `package.module:factory`. A factory is not imported here: configs are code, run only when the run is built."""
    kind = name.partition(":")[0]
    if kind in ("torchvision", "timm"):
        _builder(name)
    elif not FACTORY_NAME.fullmatch(name):
        raise ValueError(f"unknown model {name!r}: name torchvision:<name>, timm:<name> or package.module:factory")
    elif kind == "builtins":
        raise ValueError(f"model {name!r}: builtins holds Python's own functions, not a model factory; name "
                         "package.module:factory")
    else:
        check_allowed(kind, f"model {name!r}")


def _builder(name: str) -> Callable[..., nn.Module]:
    kind, _, target = name.partition(":")
    if kind == "torchvision":
        import torchvision.models

        if target not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"unknown model {name!r}: torchvision has no classification model {target!r} "
                             "(torchvision.models.list_models() lists them)")
        return lambda **kwargs: torchvision.models.get_model(target, weights=None, **kwargs)
    if kind == "timm":
        import timm

        if not timm.is_model(target):
            raise ValueError(f"unknown model {name!r}: timm has no model {target!r} (timm.list_models() lists them)")
        return lambda **kwargs: timm.create_model(target, pretrained=False, **kwargs)
    check_allowed(kind, f"model {name!r}")
    try:
        factory = getattr(importlib.import_module(kind), target)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"unknown model {name!r}: cannot import {target!r} from {kind!r} ({err}); use "
                         "torchvision:<name>, timm:<name> or package.module:factory with the package importable "
                         "on every worker") from None
    if not callable(factory):
        raise ValueError(f"model {name!r}: {kind}.{target} is not callable; name a function returning an nn.Module")
    return factory


def build_external(name: str, num_classes: int, in_channels: int = 3, model_kwargs: dict[str, Any] | None = None,
                   stages: list[str] | tuple[str, ...] | None = None) -> nn.Module:
    """The model `name` with `num_classes` outputs, as a StagedNet-like module (see the module docstring)."""
    from ray_kd.models.base import StagedNet

    kind = name.partition(":")[0]
    kwargs = dict(model_kwargs or {})
    builder = _builder(name)
    if kind == "torchvision":
        if in_channels != 3:
            raise ValueError(f"model {name!r} takes 3-channel images but this dataset has {in_channels}; "
                             "use a timm: model (built with in_chans) or a built-in model")
        model = builder(num_classes=num_classes, **kwargs)
    elif kind == "timm":
        model = builder(num_classes=num_classes, in_chans=in_channels, **kwargs)
    else:
        model = _call_factory(name, builder, num_classes, in_channels, kwargs)
        if isinstance(model, StagedNet) and stages is None:
            return model  # already speaks the zoo's protocol
    if stages is not None:
        names = list(stages)
    elif kind == "timm":
        names = [f["module"] for f in getattr(model, "feature_info", []) if f.get("reduction", 1) >= 4
                 and f.get("hook_type", "forward") == "forward"]
    elif kind == "torchvision":
        names = _downsampling_blocks(model, in_channels)
    else:
        names = []
    return ExternalNet(name, model, names, in_channels, declared=stages is not None)


def _call_factory(name: str, factory: Callable[..., nn.Module], num_classes: int, in_channels: int,
                  kwargs: dict[str, Any]) -> nn.Module:
    """Pass num_classes / in_channels where the factory takes them; else replace its last Linear."""
    params = inspect.signature(factory).parameters
    if "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["num_classes"] = num_classes
    for arg in ("in_channels", "in_chans"):
        if arg in params:
            kwargs[arg] = in_channels
    try:
        model = factory(**kwargs)
    except (Exception, SystemExit) as err:  # the factory is the user's code: its failure is theirs to see, in one line
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise ValueError(f"model {name!r}: its factory raised {type(err).__name__}: {first}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned {type(model).__name__}, not an nn.Module")
    if "num_classes" not in kwargs:
        _set_classes(name, model, num_classes)
    return model


def _set_classes(name: str, model: nn.Module, num_classes: int) -> None:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"model {name!r} takes no num_classes argument and has no nn.Linear classifier to "
                         "replace; give the factory a num_classes parameter")
    path, last = linears[-1]
    if last.out_features != num_classes:
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.Linear(last.in_features, num_classes, last.bias is not None))


class ExternalNet(nn.Module):
    """A library's model returning `(logits, [stage maps])`; the maps are its named submodules' outputs.

    The wrapped model is the submodule `model`, so its keys are the library's own
    with a `model.` prefix (`ray_kd.weights` maps files written by the library).
    """

    def __init__(self, name: str, model: nn.Module, stage_names: list[str], in_channels: int, declared: bool):
        super().__init__()
        self.name, self.model = name, model
        self.stage_names = list(stage_names)
        with _capturing(self.stages) as captured:
            if self.stage_names:
                _probe_forward(model, in_channels)
        outputs = [captured.get(i) for i in range(len(self.stage_names))]
        shapes = [tuple(o.shape) if isinstance(o, torch.Tensor) else None for o in outputs]
        if not all(s is not None and len(s) == 4 for s in shapes):
            if declared:
                raise ValueError(f"model {name!r}: the declared stages {self.stage_names} must each output one "
                                 f"N x C x H x W feature map, got shapes {shapes}")
            self.stage_names, outputs = [], []  # e.g. a ViT's tokens: logits only
        self.stage_channels = [int(o.shape[1]) for o in outputs]
        # A fresh copy of the last stage can stand in for it only if it runs on the previous stage's map alone.
        last_input = captured.get("last_input", ())
        self.separable_last_stage = len(outputs) >= 2 and len(last_input) == 1 and last_input[0] is outputs[-2]

    @property
    def stages(self) -> list[nn.Module]:
        """The stage modules (not registered a second time, so the state dict keeps the library's keys)."""
        return [self.model.get_submodule(n) for n in self.stage_names]

    logits_only = False
    """The served form (the logged MLflow model): images in, logits out, with the training form's state dict."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]] | torch.Tensor:
        with _capturing([] if self.logits_only else self.stages) as captured:
            logits = self.model(x)
        if not isinstance(logits, torch.Tensor):  # e.g. torchvision GoogLeNet's (logits, aux...) in train mode
            logits = logits[0]
        return logits if self.logits_only else (logits, [captured[i] for i in range(len(self.stage_names))])


@contextmanager
def _capturing(stages: list[nn.Module]):
    """Hooks, for one forward only, that keep each stage's output by index and the last stage's inputs.

    Registered per call and removed after, so no hook outlives the call: a copy of a
    stage (SOKD's bridge) is a plain module, and the net deep-copies and pickles cleanly.
    """
    captured: dict = {}
    handles = [stage.register_forward_hook(lambda module, args, out, i=i: captured.__setitem__(i, out))
               for i, stage in enumerate(stages)]
    if stages:
        handles.append(stages[-1].register_forward_pre_hook(
            lambda module, args: captured.__setitem__("last_input", args)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _probe_forward(model: nn.Module, in_channels: int) -> int:
    """Run one zero image through `model` at the first size in PROBE_SIZES it takes; returns that size.

    Eval mode and no grad: no BatchNorm statistics move and no RNG is drawn, so the
    weights and the seeded initialisation of every role stay as they were.
    """
    error = None
    was_training = model.training
    model.eval()
    try:
        for size in PROBE_SIZES:
            try:
                with torch.no_grad():
                    model(torch.zeros(1, in_channels, size, size))
                return size
            except (RuntimeError, AssertionError, ValueError) as err:  # too small/large for it: try the next
                error = err
    finally:
        model.train(was_training)
    raise ValueError(f"cannot run the model on a probe image of any size in {PROBE_SIZES} to read its stage "
                     f"shapes ({str(error).splitlines()[0]})")


def _downsampling_blocks(model: nn.Module, in_channels: int) -> list[str]:
    """torchvision: the last block at each resolution from 1/4 down, blocks being the top-level children,
    or the children of a top-level Sequential that itself spans resolutions (e.g. `features`)."""
    pools = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)  # resample to a fixed size: not a stage
    candidates = {name: module for name, module in model.named_modules()
                  if name and name.count(".") <= 1 and not isinstance(module, pools)}
    order: list[str] = []
    shapes: dict[str, tuple] = {}

    def record(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                order.append(name)
                shapes[name] = tuple(output.shape)
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in candidates.items()]
    try:
        size = _probe_forward(model, in_channels)
    finally:
        for h in handles:
            h.remove()

    def side(name):  # spatial side of a square N x C x H x W map; None otherwise (tokens, NHWC, pooled)
        s = shapes.get(name)
        return s[2] if s is not None and len(s) == 4 and s[2] == s[3] and s[2] > 1 else None

    def spans(top):
        return len({side(n) for n in order if n.startswith(top + ".") and side(n)}) > 1

    last_at: dict[int, str] = {}
    for name in dict.fromkeys(order):  # execution order, first call of each
        top = name.split(".")[0]
        deep = isinstance(candidates[top], nn.Sequential) and spans(top)
        if ("." in name) != deep or not side(name):
            continue
        reduction = size // side(name)
        if reduction >= 4 and (not last_at or reduction >= max(last_at)):
            last_at[reduction] = name
    names = [last_at[r] for r in sorted(last_at)]
    return names if len(names) >= 2 else []


@dataclass(frozen=True)
class StageInfo:
    """What a feature method needs to know of a model."""

    channels: list[int]
    separable_last_stage: bool  # a fresh copy of the last stage can run on the previous stage's map


def stage_info(net: nn.Module) -> StageInfo:
    if isinstance(net, ExternalNet):
        return StageInfo(net.stage_channels, net.separable_last_stage)
    return StageInfo(list(net.stage_channels), len(net.stage_channels) >= 2)  # the zoo: stem -> stages -> head


def require_stages(method: str, role, net: nn.Module, field: str, *, min_stages: int = 1,
                   separable_last: bool = False) -> StageInfo:
    """Raise ValueError (one line naming the model and the field to set) when `net` lacks what `method` needs."""
    info = stage_info(net)
    if len(info.channels) < min_stages:
        found = f"has {len(info.channels)} stage feature maps" if info.channels else "has no stage feature maps"
        raise ValueError(f"{method} needs {min_stages}+ stage feature maps but {role.name}'s model {role.model!r} "
                         f"{found}; set {field}.stages to its stage modules' names in order "
                         f"(e.g. {field}.stages=[layer1,layer2,layer3,layer4])")
    if separable_last and not info.separable_last_stage:
        raise ValueError(f"{method} copies the last stage of {role.name}'s model {role.model!r}, but that stage "
                         "does not run on the previous stage's output alone; set "
                         f"{field}.stages so its last module takes the previous one's output "
                         "(e.g. [layer1,layer2,layer3,layer4])")
    return info


def role_field(role) -> str:
    """The config path of a role: teacher -> 'teacher', student_1 -> 'students.1'."""
    return "teacher" if role.is_teacher else f"students.{role.name.split('_')[1]}"
