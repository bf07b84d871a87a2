"""Pretrained weights from the libraries' own hubs: `pretrained: true` on a `torchvision:` or `timm:` role.

torchvision's weights are the model's DEFAULT ones (`get_model_weights(name).DEFAULT`), a file in torch.hub's
cache (`$TORCH_HOME/hub/checkpoints/<file>`); timm's are the name's tag (`timm:resnet50.a1_in1k`, or the
default tag), a repo in the Hugging Face cache (`$HF_HOME/hub/models--timm--<name>/`), or for its older weights
a file in torch.hub's cache. A file already in the cache is read without a network, so a machine without
internet works from a cache filled beforehand; otherwise it is downloaded into the cache. When neither works,
one line names the file or repo looked for, the python line that fills the cache on a machine with internet,
and the variable that points at the cache.

The weights come out as the library's state dict at its own class count; `ray_kd.weights` fits them onto the
role's network as it does a checkpoint (a head for another class count needs `replace_head: true`). Their
mean/std are the data's default normalisation (`RunConfig`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch

from ray_kd.errors import UserError

HF_FILES = ("model.safetensors", "pytorch_model.bin")
"""The weight files of a timm repo on the Hugging Face hub, in the order timm reads them."""


class HubWeightsError(UserError, RuntimeError):
    """The pretrained weights are neither in the library's cache nor downloadable here."""


@dataclass(frozen=True)
class HubWeights:
    """What a library publishes about a model's pretrained weights (read without any download)."""

    library: str  # torchvision | timm
    name: str  # e.g. mobilenet_v3_small.IMAGENET1K_V1, mobilenetv3_small_050.lamb_in1k
    mean: tuple[float, ...]
    std: tuple[float, ...]
    url: str | None  # a torch.hub file (torchvision; timm's older weights)
    hf_repo: str | None  # a Hugging Face repo (timm)

    @property
    def shown(self) -> str:
        return f"{self.library}'s pretrained {self.name}"


def hub_weights(model: str) -> HubWeights:
    """The pretrained weights of `model` (`torchvision:<name>` or `timm:<name>[.<tag>]`); ValueError (one line)
    when the library has none for it."""
    library, _, target = model.partition(":")
    if library == "torchvision":
        from torchvision.models import get_model_weights

        weights = get_model_weights(target).DEFAULT
        transform = weights.transforms()
        return HubWeights(library, f"{target}.{weights.name}", tuple(transform.mean), tuple(transform.std),
                          weights.url, None)
    if library == "timm":
        from timm.models import get_pretrained_cfg

        try:
            cfg = get_pretrained_cfg(target)
        except RuntimeError as err:  # an unknown tag
            raise ValueError(f"model {model!r}: {err} (timm.list_pretrained('{target.split('.')[0]}*') lists "
                             "the tags)") from None
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise ValueError(f"model {model!r}: timm publishes no pretrained weights for it; remove pretrained "
                             "or pick a name timm.list_pretrained() lists")
        name = cfg.hf_hub_id.split("/")[-1] if cfg.hf_hub_id else f"{cfg.architecture}.{cfg.tag}"
        return HubWeights(library, name, tuple(cfg.mean), tuple(cfg.std), cfg.url, cfg.hf_hub_id)
    raise ValueError(f"model {model!r}: pretrained takes a torchvision: or timm: model; for another model "
                     "give its weights file as checkpoint")


def pretrained_state(model: str, in_channels: int, model_kwargs: dict, field: str) -> dict[str, torch.Tensor]:
    """The library's state dict of `model`'s pretrained weights at the library's class count (timm adapts
    its first conv to `in_channels`). `field` (e.g. `students.0`) names the role in the error line."""
    weights = hub_weights(model)
    if weights.library == "torchvision":
        return _torch_hub_file(weights, field, _torchvision_fill(model))
    import timm

    if weights.hf_repo is not None:
        state = _hf_file(weights, field)
    else:
        state = _torch_hub_file(weights, field, _timm_fill(model))
    try:  # timm's own loader: its per-model key filters and the first conv's adaptation to another channel count
        net = timm.create_model(model.partition(":")[2], pretrained=True, in_chans=in_channels,
                                pretrained_cfg_overlay={"state_dict": state}, **model_kwargs)
    except RuntimeError as err:  # a cached file of other shapes (load_state_dict's mismatch)
        raise HubWeightsError(f"{field}.pretrained: {weights.shown} in the cache does not fit {model} "
                              f"({_reason(err)}); delete it from the cache to fetch it again") from None
    return net.state_dict()


def _torchvision_fill(model: str) -> str:
    return (f"python -c \"import torchvision; torchvision.models.get_model_weights('{model.partition(':')[2]}')"
            ".DEFAULT.get_state_dict()\"")


def _timm_fill(model: str) -> str:
    return f"python -c \"import timm; timm.create_model('{model.partition(':')[2]}', pretrained=True)\""


def _torch_hub_file(weights: HubWeights, field: str, fill: str) -> dict[str, torch.Tensor]:
    """The weights file at `weights.url` from torch.hub's cache, downloaded there (hash checked) if missing."""
    from ray_kd.checkpoint import safe_load

    name = Path(urlsplit(weights.url).path).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if path.is_file():
        return safe_load(path)
    try:
        return torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True, weights_only=True,
                                                  map_location="cpu")
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a hash mismatch a RuntimeError
        raise HubWeightsError(
            f"{field}.pretrained: {weights.shown} is not in torch.hub's cache (looked for {path}) and could not be "
            f"downloaded ({_reason(err)}); on a machine with internet run {fill} and copy "
            f"$TORCH_HOME/hub/checkpoints/{name} (TORCH_HOME defaults to ~/.cache/torch) to {path}, or point "
            "TORCH_HOME at a copy of that cache") from None


def hf_cache() -> Path:
    """The Hugging Face hub cache as huggingface_hub resolves it, read from the environment now (so a cache
    set after import, as in a test, is the one used)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def _hf_file(weights: HubWeights, field: str) -> dict[str, torch.Tensor]:
    """The repo's weights from the Hugging Face cache, downloaded there if missing (not with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    cache = hf_cache()
    found = next((p for p in (try_to_load_from_cache(weights.hf_repo, f, cache_dir=cache) for f in HF_FILES)
                  if isinstance(p, str)), None)
    reason = "HF_HUB_OFFLINE is set"
    if found is None and os.environ.get("HF_HUB_OFFLINE", "").upper() not in ("1", "ON", "YES", "TRUE"):
        for file in HF_FILES:
            try:
                found = hf_hub_download(weights.hf_repo, file, cache_dir=cache)
                break
            except EntryNotFoundError:
                continue
            except Exception as err:  # huggingface_hub raises many kinds for a network it cannot reach
                reason = f"download failed: {_reason(err)}"
                break
    if found is None:
        folder = cache / f"models--{weights.hf_repo.replace('/', '--')}"
        raise HubWeightsError(
            f"{field}.pretrained: {weights.shown} is not in the Hugging Face cache (looked for repo "
            f"{weights.hf_repo}, {' or '.join(HF_FILES)}, in {folder}; {reason}); on a machine with internet run "
            f"{_timm_fill('timm:' + weights.name)} and copy its $HF_HOME/hub/{folder.name} (HF_HOME defaults to "
            "~/.cache/huggingface) to the same place under this machine's HF_HOME") from None
    return _read(Path(found))


def _read(path: Path) -> dict[str, torch.Tensor]:
    from ray_kd.checkpoint import safe_load

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return safe_load(path)


def _reason(err: BaseException) -> str:
    """The error on one line: its type and (a URLError's reason, or its message) whitespace-collapsed, cut."""
    text = " ".join(str(getattr(err, "reason", None) or err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__
