"""A role's network with the weights from its `checkpoint` file, whoever wrote the file, or from its
library's hub (`pretrained: true`, read through `ray_kd.hub_weights`), fitted onto the network alike.

Accepted, and always read without unpickling code (`torch.load(weights_only=True)`,
or safetensors): a `ray-kd train-teacher` file (checked against the model, class count
and channels it was trained for), a bare state dict as torchvision, timm or
`torch.save(model.state_dict())` write it (.pth/.pt), a `.safetensors` file, and a
dict holding the state dict under `state_dict` or `model` (training scripts' checkpoints).
The keys of a library's file are the library's own; the adapter holds the library's
model as its submodule `model`, so they are mapped onto `model.<key>` (and a
DistributedDataParallel `module.` prefix is dropped).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ray_kd.checkpoint import CheckpointError, load_model_file, require_file, safe_load
from ray_kd.models import create_model
from ray_kd.models.external import ExternalNet, role_field

SHOWN = 3
"""Keys named per kind in a mismatch message."""


def load_backbone(role, num_classes: int, in_channels: int) -> nn.Module:
    """`role`'s model for `num_classes` classes, with its checkpoint's weights when it names one, or its
    library's pretrained weights (`pretrained: true`, `ray_kd.hub_weights`)."""
    net = create_model(role.model, num_classes, in_channels, **role.model_options)
    if role.checkpoint is not None:
        load_weights(net, role, num_classes, in_channels)
    elif role.pretrained:
        from ray_kd.hub_weights import hub_weights, pretrained_state

        state = pretrained_state(role.model, in_channels, role.model_kwargs, role_field(role))
        fit_weights(net, role, state, num_classes, hub_weights(role.model).shown)
    return net


def load_weights(net: nn.Module, role, num_classes: int, in_channels: int) -> None:
    path = Path(role.checkpoint)
    fit_weights(net, role, read_state_dict(path, role.model, num_classes, in_channels), num_classes,
                f"checkpoint {path}", path.name)


def fit_weights(net: nn.Module, role, state: dict[str, torch.Tensor], num_classes: int, source: str,
                short: str | None = None) -> None:
    """Load `state` (the library's keys or the net's) into `net`; a head for another class count is replaced
    when the role says `replace_head`, any other mismatch is one line. `source` names the weights in messages
    (`short` in the printed line)."""
    state = _map_keys(state, net)
    target = net.state_dict()
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]  # old BN files
    unexpected = [k for k in state if k not in target]
    mismatched = [k for k in state if k in target and state[k].shape != target[k].shape]
    head = [k for k in mismatched if _is_head(target[k], state[k], num_classes)]
    if head and len(head) == len(mismatched) and not missing and not unexpected:
        file_classes = state[head[0]].shape[0]
        if not role.replace_head:
            raise CheckpointError(
                f"{source} has a {file_classes}-class head ({', '.join(head)}) but this run has "
                f"{num_classes} classes; set {role_field(role)}.replace_head=true to start a fresh "
                f"{num_classes}-class head, or use weights trained for {num_classes} classes")
        for key in head:
            del state[key]
        mismatched = []
        frozen = " (a frozen teacher never trains it: fine-tune first with `ray-kd train-teacher`)" \
            if role.is_teacher else ""
        print(f"{role.name}: replaced the {file_classes}-class head of {short or source} ({', '.join(head)}) with a fresh "
              f"{num_classes}-class head (replace_head=true){frozen}", flush=True)
    if missing or unexpected or mismatched:
        raise CheckpointError(f"{source} does not fit {role.name}'s model {role.model!r}: "
                              + "; ".join(_listed(name, keys, state, target) for name, keys in
                                          (("missing", missing), ("unexpected", unexpected),
                                           ("of another shape", mismatched)) if keys)
                              + "; check the model name and model_kwargs against the weights")
    net.load_state_dict({**target, **state})


def read_state_dict(path: Path, model_name: str, num_classes: int, in_channels: int) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, by key (the forms in the module docstring)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        require_file(path)
        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error types for a damaged file
            raise CheckpointError(f"checkpoint {path} is not a readable .safetensors file "
                                  f"({type(err).__name__}: {err})") from None
    blob = safe_load(path)
    if isinstance(blob, dict) and isinstance(blob.get("model"), str) and "num_classes" in blob:
        return load_model_file(path, model_name, num_classes, in_channels)  # written by ray-kd
    for key in ("state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict) or not blob or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict (a mapping of names to tensors, bare or "
                              "under 'state_dict' or 'model'); save one with torch.save(model.state_dict(), path)")
    return blob


def _map_keys(state: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """The file's keys renamed to the net's: the reading that matches most of them."""
    target = net.state_dict()

    def strip(key):
        return key.removeprefix("module.")

    readings = [lambda k: k, strip]
    if isinstance(net, ExternalNet):
        readings += [lambda k: "model." + k, lambda k: "model." + strip(k)]
    best = max(readings, key=lambda rename: sum(rename(k) in target for k in state))
    return {best(k): v for k, v in state.items()}


def _is_head(model_tensor: torch.Tensor, file_tensor: torch.Tensor, num_classes: int) -> bool:
    """A classifier weight or bias: one row per class here, another count of rows in the file."""
    return (model_tensor.dim() == file_tensor.dim() and model_tensor.shape[0] == num_classes
            and file_tensor.shape[0] != num_classes and model_tensor.shape[1:] == file_tensor.shape[1:])


def _listed(kind: str, keys: list[str], state: dict, target: dict) -> str:
    shown = keys[:SHOWN]
    if kind == "of another shape":
        shown = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in shown]
    more = ", ..." if len(keys) > SHOWN else ""
    return f"{len(keys)} {kind} ({', '.join(shown)}{more})"
