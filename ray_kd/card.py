"""The student's card: what it costs to run, against the teacher it replaces.

People distil to ship a smaller model, so a run ends by measuring what the student buys: parameters, FLOPs
per image (`torch.utils.flop_counter`, multiply-adds counted as 2), the size of its weights as `torch.save`
writes them, CPU latency at batch 1 (median and p95 over a fixed count of timed runs, after warm-up) and
throughput at batch 64, and on a machine with a GPU the GPU latency too. Both models are measured alike:
the shipped form (`ray_kd.deliverable.RawImageModel`, preprocessing included) on uint8 images of the run's
size, in this process, with its torch thread count stated.

A run with a teacher compares the student against it (ratios teacher/student; the accuracy gap in top-1
points, student minus teacher). A run without one (the student alone, DML and other peer methods) has a
card for the student alone: its peers are trained beside it, not a model it replaces, so a ratio against
one would not say what distillation bought.
"""

from __future__ import annotations

import io
import statistics
import time

import torch
from torch import nn

LATENCY_RUNS = 30
"""Timed batch-1 runs (after WARMUP untimed ones): the median and p95 of these."""
THROUGHPUT_RUNS = 3
THROUGHPUT_BATCH = 64
WARMUP = 3


def weights_bytes(model: nn.Module) -> int:
    """The size of the model's state dict as `torch.save` writes it."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def flops_per_image(model: nn.Module, image: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(image[:1])
    return int(counter.get_total_flops())


def _timed(model: nn.Module, batch: torch.Tensor, runs: int, sync=lambda: None) -> list[float]:
    """Seconds of each of `runs` forward passes, after WARMUP untimed ones."""
    times = []
    with torch.inference_mode():
        for i in range(WARMUP + runs):
            start = time.perf_counter()
            model(batch)
            sync()
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
    return times


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


def measure(model: nn.Module, shape: tuple[int, ...]) -> dict:
    """The cost figures of `model` (images in, see ray_kd.deliverable) on uint8 images of `shape` (C, H, W)."""
    model = model.eval()
    gen = torch.Generator().manual_seed(0)
    one = torch.randint(0, 256, (1, *shape), dtype=torch.uint8, generator=gen)
    many = torch.randint(0, 256, (THROUGHPUT_BATCH, *shape), dtype=torch.uint8, generator=gen)
    latency = _timed(model, one, LATENCY_RUNS)
    throughput = _timed(model, many, THROUGHPUT_RUNS)
    out = {"params": sum(p.numel() for p in model.parameters()), "flops_per_image": flops_per_image(model, one),
           "weights_bytes": weights_bytes(model),
           "cpu_latency_ms_b1": {"median": 1e3 * statistics.median(latency), "p95": 1e3 * p95(latency)},
           f"cpu_images_per_s_b{THROUGHPUT_BATCH}": THROUGHPUT_BATCH / statistics.median(throughput)}
    if torch.cuda.is_available():
        import copy

        gpu = copy.deepcopy(model).cuda()
        times = _timed(gpu, one.cuda(), LATENCY_RUNS, torch.cuda.synchronize)
        out["gpu_latency_ms_b1"] = {"median": 1e3 * statistics.median(times), "p95": 1e3 * p95(times)}
    return out


def ratios(student: dict, teacher: dict) -> dict:
    """How many times fewer / faster the student is (teacher over student; throughput student over teacher)."""
    out = {"params": teacher["params"] / student["params"],
           "flops": teacher["flops_per_image"] / max(student["flops_per_image"], 1),
           "weights_bytes": teacher["weights_bytes"] / student["weights_bytes"],
           "cpu_latency_b1": teacher["cpu_latency_ms_b1"]["median"] / student["cpu_latency_ms_b1"]["median"],
           f"cpu_throughput_b{THROUGHPUT_BATCH}": (student[f"cpu_images_per_s_b{THROUGHPUT_BATCH}"]
                                                   / teacher[f"cpu_images_per_s_b{THROUGHPUT_BATCH}"])}
    if "gpu_latency_ms_b1" in student and "gpu_latency_ms_b1" in teacher:
        out["gpu_latency_b1"] = teacher["gpu_latency_ms_b1"]["median"] / student["gpu_latency_ms_b1"]["median"]
    return out


def make_card(student: nn.Module, student_name: str, student_acc: float | None, teacher: nn.Module | None = None,
              teacher_name: str | None = None, teacher_acc: float | None = None) -> dict:
    """The card (see the module docstring) of two shipped models, or of the student alone; `*_acc` is test
    top-1 (None: not scored)."""
    shape = (student.in_channels, *student.image_size)
    card = {"input": student.describe(), "cpu_threads": torch.get_num_threads(),
            "student": {"model": student_name, "test_acc": student_acc, **measure(student, shape)}, "teacher": None}
    if teacher is not None:
        card["teacher"] = {"model": teacher_name, "test_acc": teacher_acc, **measure(teacher, shape)}
        card["ratios"] = ratios(card["student"], card["teacher"])
        card["acc_gap"] = None if student_acc is None or teacher_acc is None else student_acc - teacher_acc
    card["line"] = card_line(card)
    return card


def _times(ratio: float, fewer: str, more: str) -> str:
    return f"{ratio:.1f}x {fewer}" if ratio >= 1 else f"{1 / ratio:.1f}x {more}"


def _amount(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def _size(n: int) -> str:
    return f"{n / 1e6:.3g} MB" if n >= 1e6 else f"{n / 1e3:.3g} kB"


def card_line(card: dict) -> str:
    s, threads = card["student"], card["cpu_threads"]
    b = THROUGHPUT_BATCH
    alone = (f"{s['model']}: {_amount(s['params'])} params, {_amount(s['flops_per_image'])} FLOPs/image, "
             f"{_size(s['weights_bytes'])}, {s['cpu_latency_ms_b1']['median']:.3g} ms at batch 1 "
             f"(p95 {s['cpu_latency_ms_b1']['p95']:.3g}), {_amount(s[f'cpu_images_per_s_b{b}'])} images/s at "
             f"batch {b} (CPU, {threads} torch thread{'s' if threads > 1 else ''})")
    if card["teacher"] is None:
        return f"card: {alone}"
    r, gap = card["ratios"], card["acc_gap"]
    gpu = f", {_times(r['gpu_latency_b1'], 'faster', 'slower')} on GPU" if "gpu_latency_b1" in r else ""
    return (f"card: student {_times(r['flops'], 'fewer FLOPs', 'more FLOPs')}, "
            f"{_times(r['params'], 'fewer params', 'more params')}, "
            f"{_times(r['weights_bytes'], 'smaller file', 'larger file')}, "
            f"{_times(r['cpu_latency_b1'], 'faster', 'slower')} at batch 1{gpu}, "
            f"{_times(r[f'cpu_throughput_b{b}'], 'the throughput', 'less throughput')} at batch {b}, "
            + ("top-1 not scored" if gap is None else f"{gap:+.1f} top-1")
            + f" than the teacher {card['teacher']['model']} ({alone})")


CARD = "student_vs_teacher"
"""The MLflow metric prefix of the card."""


def metrics(card: dict) -> dict[str, float]:
    """The card as flat MLflow metric names and values (`student_vs_teacher/student/...`, `.../teacher/...`,
    `.../ratio/...`): a chart section that sorts after the roles' own (MLflow orders sections by name)."""
    out = {f"{CARD}/cpu_threads": float(card["cpu_threads"])}
    for who in ("student", "teacher"):
        for key, value in (card[who] or {}).items():
            if isinstance(value, dict):
                out.update({f"{CARD}/{who}/{key}_{k}": float(v) for k, v in value.items()})
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{CARD}/{who}/{key}"] = float(value)
    out.update({f"{CARD}/ratio/{k}": float(v) for k, v in card.get("ratios", {}).items()})
    if card.get("acc_gap") is not None:
        out[f"{CARD}/acc_gap"] = float(card["acc_gap"])
    return out


def run_card(cfg, data, student: nn.Module, summary: dict) -> dict:
    """The card of a finished run: its shipped student against its teacher (built as configured; weights do not
    change the cost) when it has one."""
    from ray_kd.deliverable import RawImageModel
    from ray_kd.models import create_model

    head = summary["headline"]
    arch = cfg.students[int(summary["best_role"].split("_")[1])].model
    teacher = teacher_acc = None
    if cfg.teacher is not None:
        net = create_model(cfg.teacher.model, data.num_classes, data.in_channels, **cfg.teacher.model_options)
        teacher = RawImageModel(net, student.mean.flatten(), student.std.flatten(), student.image_size, student.resize)
        teacher_acc = (summary["roles"].get("teacher") or {}).get("test_acc_at_best_val")
    return make_card(student, arch, head["test_acc_at_best_val"], teacher,
                     cfg.teacher.model if cfg.teacher else None, teacher_acc)


def log_card(mlflow, run_id: str, card: dict) -> None:
    """The card's figures as the run's metrics, once at step 0 (MLflow's UI draws a metric whose only step is 0
    as a bar, one at a later step as a lone dot), and its line as a tag."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    mlflow.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics(card).items()])
    mlflow.set_tag(run_id, "ray_kd.card", card["line"])
