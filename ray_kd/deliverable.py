"""The student as shipped: a model that takes images as the data set holds them, not normalised tensors.

Training feeds its networks float batches standardised with the run's mean/std. A user has images.
`RawImageModel` holds the network together with that preprocessing (the mean/std as buffers), so it takes
uint8 N x C x H x W images, 0-255, at the run's size: what `Dataset.*.images` holds in memory mode, and
what the evaluation transform (`ray_kd.streaming.eval_transform`: resize, centre crop) yields in stream
mode. Float images in [0, 1] are taken too. This is the form of the logged MLflow model, of
`load_student(best_student.pt)` and of every exported file (`ray_kd.export`).

`best_student.pt` records what the wrapper needs (`preprocessing`), the model's builder options and the
data config (so an export can score the run's test split), all as plain values (`weights_only=True`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ray_kd.checkpoint import CheckpointError, safe_load
from ray_kd.run_storage import BEST_STUDENT

INPUT = "uint8 images, N x C x H x W, values 0-255 (float in [0, 1] also taken), at the run's image size"


class RawImageModel(nn.Module):
    """Images in (see INPUT), logits out: the network with the run's normalisation inside."""

    def __init__(self, net: nn.Module, mean, std, image_size, resize: int | None = None):
        super().__init__()
        self.net = net
        net.logits_only = True  # the zoo's and ExternalNet's served form: logits without the stage maps
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.image_size = tuple(int(s) for s in image_size)  # (H, W) the network was trained on
        self.resize = resize  # stream mode: the shorter side evaluation resizes to before the centre crop

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32)
        if not images.is_floating_point():
            x = x / 255
        return self.net((x - self.mean) / self.std)

    @property
    def in_channels(self) -> int:
        return self.mean.shape[1]

    def transform(self):
        """PIL image -> the uint8 C x H x W tensor this model takes: the run's evaluation resize and centre crop
        (stream mode), or a resize to the run's size (memory mode, whose images all have that size)."""
        from torchvision.transforms import v2

        from ray_kd.streaming import eval_transform

        mode = "L" if self.in_channels == 1 else "RGB"
        to_mode = v2.Lambda(lambda image: image.convert(mode))
        if self.resize is not None:
            return v2.Compose([to_mode, eval_transform(self.image_size[0])])
        return v2.Compose([to_mode, v2.PILToTensor(), v2.Resize(self.image_size, antialias=True)])

    def describe(self) -> str:
        h, w = self.image_size
        crop = (f"; from any image: shorter side resized to {self.resize}, centre crop {h}x{w} "
                "(`model.transform()`)" if self.resize is not None else "")
        return f"input: uint8 N x {self.in_channels} x {h} x {w}, 0-255 (float in [0, 1] also taken){crop}"


def preprocessing(cfg_data, data) -> dict:
    """What the wrapper needs, as plain values: the run's mean/std, image size and (stream mode) resize."""
    from ray_kd.streaming import DEFAULT_IMAGE_SIZE, eval_resize

    if cfg_data.mode == "stream":
        size = cfg_data.image_size or DEFAULT_IMAGE_SIZE
        image_size, resize = [size, size], eval_resize(size)
    else:
        image_size, resize = list(data.test.images.shape[2:]), None
    return {"input": INPUT, "mean": [float(v) for v in data.mean], "std": [float(v) for v in data.std],
            "image_size": image_size, "resize": resize}


def shipped_meta(cfg, data, student_index: int) -> dict:
    """The keys `best_student.pt` holds beside the weights so `load_student` and `ray-kd export` need no config."""
    import json

    role = cfg.students[student_index]
    return {"preprocessing": preprocessing(cfg.data, data),
            "model_options": json.loads(json.dumps(role.model_options)),
            "data": json.loads(json.dumps(cfg.data.model_dump()))}


def wrap(net: nn.Module, prep: dict) -> RawImageModel:
    return RawImageModel(net, prep["mean"], prep["std"], prep["image_size"], prep.get("resize")).eval()


def student_file(path: str | Path) -> Path:
    """`best_student.pt` of a run folder, or the file itself."""
    path = Path(path)
    return path / BEST_STUDENT if path.is_dir() else path


def load_student(path: str | Path) -> RawImageModel:
    """The model of a run folder or of its `best_student.pt` (or a `ray-kd train-teacher` file), ready for raw
    images: `load_student("runs/digits-kd")(images_uint8).argmax(1)` gives the classes. In eval mode, on the CPU."""
    from ray_kd.models import create_model

    path = student_file(path)
    blob = safe_load(path)
    prep = blob.get("preprocessing") if isinstance(blob, dict) else None
    if not isinstance(prep, dict) or "state_dict" not in blob:
        raise CheckpointError(f"{path} records no preprocessing (mean/std, image size): it is not a best_student.pt "
                              "of this ray-kd version; train the run again (add --restart) to write one")
    net = create_model(blob["model"], blob["num_classes"], blob["in_channels"], **blob.get("model_options", {}))
    net.load_state_dict(blob["state_dict"])
    return wrap(net, prep)
