"""The training recipe (ray_kd/recipe.py): schedules against their closed forms, AdamW groups, AMP, clipping,
label smoothing, and a resume that keeps the schedule's place."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from equivalence import run_local

from ray_kd.config import DataConfig, OptimConfig, load_config
from ray_kd.data import seeded_batches
from ray_kd.datasets import load_dataset
from ray_kd.methods import Role, Step, method_class
from ray_kd.methods.losses import cross_entropy
from ray_kd.models import create_model
from ray_kd.recipe import build_optimizer, build_scheduler
from ray_kd.roles import RoleRunner

CPU = torch.device("cpu")


def lrs_per_step(optim: OptimConfig, steps_per_epoch: int) -> list[float]:
    """The lr each step of the run uses (read before the step, as the optimiser sees it)."""
    net = torch.nn.Linear(2, 2)
    opt = build_optimizer(net, list(net.parameters()), optim)
    sched = build_scheduler(opt, optim, steps_per_epoch)
    out = []
    for _ in range(optim.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_matches_the_closed_form():
    optim = OptimConfig(epochs=6, lr=0.4, schedule="cosine", warmup_epochs=1.5, warmup_start_factor=0.1)
    S, total, warm = 10, 60, 15
    lrs = lrs_per_step(optim, S)
    for t in (0, 1, 7, 14, 15, 16, 30, 45, 59):
        if t < warm:
            expected = 0.4 * (0.1 + 0.9 * t / warm)
        else:
            expected = 0.4 * (1 + math.cos(math.pi * (t - warm) / (total - warm))) / 2
        assert lrs[t] == pytest.approx(expected, rel=1e-6, abs=1e-12), t
    assert lrs[15] == pytest.approx(0.4) and 0 < lrs[-1] < 1e-3  # peak after the warmup, ~0 at the end


def test_multistep_per_iteration_gives_every_step_the_per_epoch_lr():
    optim = OptimConfig(epochs=7, lr=0.05, milestones=[2, 5], gamma=0.1)
    S = 9
    reference = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.05)
    per_epoch = torch.optim.lr_scheduler.MultiStepLR(reference, [2, 5], 0.1)  # what ran before: stepped per epoch
    expected = []
    for _ in range(optim.epochs):
        expected += [reference.param_groups[0]["lr"]] * S
        reference.step()
        per_epoch.step()
    assert lrs_per_step(optim, S) == expected  # exactly, not approximately


def test_multistep_with_warmup_keeps_its_milestones_in_epochs():
    lrs = lrs_per_step(OptimConfig(epochs=4, lr=1.0, milestones=[2], gamma=0.5, warmup_epochs=0.5), 4)
    assert lrs[:2] == pytest.approx([0.01, 0.505])  # 2 warmup steps from 0.01 x lr
    assert lrs[2:8] == pytest.approx([1.0] * 6) and lrs[8:] == pytest.approx([0.5] * 8)


def test_adamw_puts_norm_and_bias_parameters_in_a_group_without_decay():
    net = create_model("resnet8", 10, 3)
    opt = build_optimizer(net, list(net.parameters()), OptimConfig(name="adamw", weight_decay=0.05,
                                                                    no_decay_norm_bias=True))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in net.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    bn = {n for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {f"{m}.weight" for m in bn} | {f"{m}.bias" for m in bn} <= exempt
    assert all(n.endswith(".bias") or n.rsplit(".", 1)[0] in bn for n in exempt)
    assert all(p.ndim > 1 for p in decay["params"]) and len(decay["params"]) + len(exempt) == len(names)
    (one,) = build_optimizer(net, list(net.parameters()), OptimConfig(name="adamw", weight_decay=0.05)).param_groups
    assert one["weight_decay"] == 0.05 and len(one["params"]) == len(names)


def ce_runner(optim: OptimConfig, model: str = "digits_cnn_s") -> tuple[RoleRunner, object]:
    torch.set_num_threads(1)  # as runtime.threads_per_worker: tiny models only slow down with more
    data = load_dataset(DataConfig())
    method = method_class("ce")(method_class("ce").Params())
    return RoleRunner(Role("student_0", model), 0, method, data, optim, 0, CPU, steps_per_epoch=20), data


def test_bf16_autocast_on_cpu_trains():
    runner, data = ce_runner(OptimConfig(amp="bf16", lr=0.2))
    x, y = next(seeded_batches(data, 32, 0, 0))
    losses = []
    for _ in range(10):
        outputs, _ = runner.forward(x, y)
        assert outputs["logits"].dtype == torch.bfloat16  # autocast is on
        losses.append(runner.update(outputs, {}, y, epoch=0)["total"])
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in runner.net.parameters())  # weights stay fp32


def test_clipping_bounds_the_gradient_norm():
    runner, data = ce_runner(OptimConfig(clip_grad_norm=0.05))
    x, y = next(seeded_batches(data, 64, 0, 0))
    outputs, _ = runner.forward(x, y)
    loss = runner.net.losses(outputs, {}, y, Step(0, 0))["total"]
    before = runner.recipe.step(loss)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in runner.recipe.params]))
    assert before > 0.2  # clipping had something to do
    assert float(after) == pytest.approx(0.05, rel=1e-4)


def test_label_smoothing_gives_the_smoothed_cross_entropy():
    logits, labels = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 5
    log_p = F.log_softmax(logits, dim=1)
    smoothed = (0.9 * -log_p[torch.arange(8), labels] - 0.1 * log_p.mean(1)).mean()  # (1-e) CE + e uniform CE
    assert float(cross_entropy(logits, labels)) == pytest.approx(float(F.cross_entropy(logits, labels)))
    runner, _ = ce_runner(OptimConfig(label_smoothing=0.1))
    with runner.recipe.context():  # what every method's CE on labels sees inside a role's loss
        assert float(cross_entropy(logits, labels)) == pytest.approx(float(smoothed), rel=1e-6)
    assert float(cross_entropy(logits, labels)) != pytest.approx(float(smoothed))  # and only there


def test_fp16_with_a_grad_scaler_trains_and_skips_an_overflowing_step():
    """fp16 runs the GPU recipe's code path (autocast + GradScaler) on this CPU: it trains, and a step whose
    scaled gradients overflow is skipped (weights unchanged) with the scale halved, as on a GPU."""
    runner, data = ce_runner(OptimConfig(amp="fp16", lr=0.2, clip_grad_norm=5.0))
    x, y = next(seeded_batches(data, 32, 0, 0))
    losses = []
    for _ in range(10):
        outputs, _ = runner.forward(x, y)
        assert outputs["logits"].dtype == torch.float16
        losses.append(runner.update(outputs, {}, y, epoch=0)["total"])
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0], losses
    scale = runner.recipe.scaler.get_scale()
    weights = [p.detach().clone() for p in runner.recipe.params]
    outputs, _ = runner.forward(x, y)
    loss = runner.net.losses(outputs, {}, y, Step(0, 0))["total"]
    runner.recipe.step(loss * float("inf"))  # an overflow, as fp16 meets on a GPU
    assert runner.recipe.scaler.get_scale() == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(weights, runner.recipe.params))
    assert runner.recipe.state_dict()["scaler"]["scale"] == scale / 2  # kept in the checkpoint


def test_bad_warmup_is_one_config_line():
    from ray_kd.config import ConfigError

    with pytest.raises(ConfigError, match="optim.warmup_epochs=3 must be below optim.epochs=3"):
        load_config(None, ["optim.epochs=3", "optim.warmup_epochs=3"])
    with pytest.raises(ConfigError, match=r"optim.milestones \[1\] must all come after optim.warmup_epochs=1.5"):
        load_config(None, ["optim.milestones=[1]", "optim.warmup_epochs=1.5"])


def test_resume_keeps_the_schedule_place(tmp_path):
    """AdamW + cosine with warmup + bf16 + clipping + smoothing: 3 epochs straight, and the same run cut
    after epoch 2 and resumed, end with the same weights (the schedule and optimiser states were kept)."""
    recipe = ["optim.name=adamw", "optim.lr=0.003", "optim.schedule=cosine", "optim.warmup_epochs=0.5",
              "optim.amp=bf16", "optim.clip_grad_norm=1.0", "optim.label_smoothing=0.1",
              "optim.no_decay_norm_bias=true", "optim.epochs=3", "optim.steps_per_epoch=4", "runtime.executor=local", f"output_dir={tmp_path}"]
    straight = run_local(load_config(None, recipe + ["name=straight"]), show_progress=False)
    cut = load_config(None, recipe + ["name=cut"])
    last = run_local(cut, show_progress=False)
    shutil.rmtree(last)  # as if the run had stopped after epoch 2
    resumed = run_local(cut, show_progress=False)
    history = json.loads((resumed / "history.json").read_text())
    reference = json.loads((straight / "history.json").read_text())
    timing = ("_ms", "per_s", "eval_s")
    for got, want in zip(history, reference, strict=True):  # all but the timings
        assert {k: v for k, v in got.items() if not k.endswith(timing)} == pytest.approx(
            {k: v for k, v in want.items() if not k.endswith(timing)})
    assert history[-1]["student_0/loss_total"] < history[0]["student_0/loss_total"]
    a, b = (torch.load(folder / "student_0.pt", weights_only=True) for folder in (straight, resumed))
    for name, tensor in a["net"].items():
        torch.testing.assert_close(tensor, b["net"][name])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 12
    with pytest.raises(Exception, match="cosine schedule spans 12 steps but the config now gives 16"):
        run_local(load_config(None, recipe + ["name=cut", "optim.epochs=4"]), show_progress=False)


def test_channels_last_changes_the_layout_not_the_numbers():
    """runtime.channels_last lays out conv weights and image batches in NHWC: the same losses, weights and
    scores as the plain layout, to float rounding."""
    torch.set_num_threads(1)
    data = load_dataset(DataConfig())
    method = method_class("ce")(method_class("ce").Params())
    plain, nhwc = (RoleRunner(Role("student_0", "digits_cnn_l"), 0, method, data, OptimConfig(), 0, CPU, 20,
                              channels_last=layout) for layout in (False, True))
    convs = [p for p in nhwc.net.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)  # really another layout, not a no-op
    x, y = next(seeded_batches(data, 32, 0, 0))
    for _ in range(3):
        losses = [r.update(r.forward(x, y)[0], {}, y, epoch=0)["total"] for r in (plain, nhwc)]
        assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    for a, b in zip(plain.net.parameters(), nhwc.net.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert nhwc.evaluate(data) == plain.evaluate(data)
