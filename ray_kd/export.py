"""`ray-kd export`: a run's shipped student as an ONNX, TorchScript or torch.export (pt2) file, checked on export.

The exported model is `ray_kd.deliverable.RawImageModel`: uint8 N x C x H x W images in (any batch size),
logits out, the run's normalisation inside, so the file is all a user needs. Every export is validated
before it is kept: the run's test split goes through the exported file (ONNX through onnxruntime) and
through the PyTorch model, and at least MIN_AGREEMENT of the top-1 predictions must be the same.
"""

from __future__ import annotations

import io
import logging
import warnings
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import torch

from ray_kd.checkpoint import atomic_write, safe_load
from ray_kd.errors import UserError, first_line

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "pt2": ".pt2"}
MIN_AGREEMENT = 0.999
"""The share of test images on which the exported file's top-1 must equal PyTorch's."""
EXAMPLE_BATCH = 2
"""The batch the model is traced with; the batch axis stays dynamic (1 and up)."""


class ExportError(UserError, RuntimeError):
    """A model that cannot be exported to the format asked, or whose export disagrees with PyTorch."""


def export(source: str | Path, fmt: str, out: str | Path | None = None, say=print) -> dict:
    """Export the student of `source` (a run folder or its best_student.pt) to `fmt`, validate it on the run's
    test split; returns {"file", "format", "agreement", "images"}. `out` defaults to `<file stem>.<format>`
    beside the checkpoint."""
    from ray_kd.deliverable import load_student, student_file

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    path = student_file(source)
    model = load_student(path)
    blob = safe_load(path)
    out = Path(out) if out is not None else path.with_name(path.stem + FORMATS[fmt])
    example = torch.zeros(EXAMPLE_BATCH, model.in_channels, *model.image_size, dtype=torch.uint8)
    try:
        with _quiet_torch():
            atomic_write(out, lambda tmp: _WRITERS[fmt](model, example, tmp))
            run = _RUNNERS[fmt](out)
            run(example[:1])  # a batch other than the traced one: the batch axis is dynamic
    except Exception as err:  # each exporter has its own ways to fail; the reason is its first line
        raise ExportError(f"{blob['model']} cannot be exported to {fmt}: {type(err).__name__}: "
                          f"{first_line(err)[:300]}") from None
    agreement, images = _agreement(model, run, blob)
    say(f"exported {blob['model']} to {out} ({fmt}, input uint8 N x {model.in_channels} x "
        f"{model.image_size[0]} x {model.image_size[1]}): top-1 equal to PyTorch's on {100 * agreement:.2f}% "
        f"of {images} test images")
    if agreement < MIN_AGREEMENT:
        out.unlink(missing_ok=True)
        raise ExportError(f"the {fmt} export of {blob['model']} agrees with PyTorch on only {100 * agreement:.2f}% "
                          f"of the test images (at least {100 * MIN_AGREEMENT:.1f}% needed); file removed")
    return {"file": str(out), "format": fmt, "agreement": agreement, "images": images}


def _agreement(model, run, blob: dict) -> tuple[float, int]:
    """The share of the run's test images on which `run` (the exported file) and the model agree on top-1."""
    from ray_kd.config import DataConfig
    from ray_kd.data import raw_eval_batches
    from ray_kd.datasets import load_dataset

    data = load_dataset(DataConfig(**blob["data"]))
    same = total = 0
    with torch.inference_mode():
        for images, _ in raw_eval_batches(data.test, data, batch_size=256):
            same += int((run(images).argmax(1) == model(images).argmax(1)).sum())
            total += len(images)
    return same / max(total, 1), total


@contextmanager
def _quiet_torch():
    """The exporters' progress and warning logs off, and what they print to stderr (torch.export prints the
    partial graph of a failure) dropped: a failure is said in one line instead. Log levels restored after."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "torch" or name.startswith(("torch.", "onnxscript"))]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _dynamic_batch():
    return {"images": {0: torch.export.Dim("batch", min=1, max=1 << 16)}}


def _captured(model, example):
    """The model as torch.export captures it, with a dynamic batch axis (what the ONNX and pt2 files hold)."""
    return torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch())


def _write_onnx(model, example, path: Path) -> None:
    program = torch.onnx.export(_captured(model, example), input_names=["images"], output_names=["logits"],
                                dynamo=True, verbose=False, report=False)
    path.write_bytes(program.model_proto.SerializeToString())


def _write_torchscript(model, example, path: Path) -> None:
    with torch.inference_mode():
        torch.jit.save(torch.jit.trace(model, example), str(path))


def _write_pt2(model, example, path: Path) -> None:
    buffer = io.BytesIO()  # torch.export.save wants a name ending in .pt2; the temporary file's does not
    torch.export.save(_captured(model, example), buffer)
    path.write_bytes(buffer.getvalue())


def _run_onnx(path: Path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: torch.from_numpy(session.run(None, {name: images.numpy()})[0])


def _run_torchscript(path: Path):
    return torch.jit.load(str(path)).eval()


def _run_pt2(path: Path):
    return torch.export.load(str(path)).module()


_WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "pt2": _write_pt2}
_RUNNERS = {"onnx": _run_onnx, "torchscript": _run_torchscript, "pt2": _run_pt2}
