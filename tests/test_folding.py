"""A frozen teacher's BatchNorm folded into its convs (runtime.fold_frozen_batchnorm): which BatchNorms fold,
the same outputs to float rounding for every built-in model, and checkpoints that read the same folded or not."""

import copy

import pytest
import torch
from torch import nn

from ray_kd.checkpoint import save_model_file
from ray_kd.config import DataConfig, OptimConfig
from ray_kd.data import seeded_batches
from ray_kd.datasets import load_dataset
from ray_kd.methods import Role
from ray_kd.methods.kd import KD, KDParams
from ray_kd.methods.sokd import SOKD, SOKDParams
from ray_kd.models import create_model, list_models
from ray_kd.models.folding import fold_batchnorm
from ray_kd.roles import RoleRunner

CPU = torch.device("cpu")


def with_random_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorms whose folding changes the conv (fresh ones are the identity map at eval)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return net.eval()


def batchnorms(net: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def assert_same_outputs(net: nn.Module, folded: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        (logits, features), (logits_f, features_f) = net(x), folded(x)
    for a, b in zip([logits, *features], [logits_f, *features_f], strict=True):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


@pytest.mark.parametrize("name", list_models())
def test_every_built_in_model_computes_the_same_folded(name):
    digits = name.startswith("digits")
    net = with_random_statistics(create_model(name, 10, 1 if digits else 3))
    folded = copy.deepcopy(net)
    count, before = fold_batchnorm(folded), batchnorms(net)
    # Pre-activation blocks (WRN) put BN -> ReLU before a conv: only the BNs right after a conv fold
    assert count == before - batchnorms(folded) and count >= (before // 2 if name.startswith("wrn") else before)
    assert_same_outputs(net, folded, torch.randn(4, 1 if digits else 3, *(8, 8) if digits else (32, 32)))


def test_a_torchvision_model_folds_too():
    net = with_random_statistics(create_model("torchvision:resnet18", 10))
    folded = copy.deepcopy(net)
    assert fold_batchnorm(folded) == batchnorms(net) == 20 and batchnorms(folded) == 0
    assert_same_outputs(net, folded, torch.randn(2, 3, 32, 32))


class SharedConvOutput(nn.Module):
    """A conv whose output feeds its BatchNorm and a shortcut: folding would change the shortcut."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class DataDependent(nn.Module):
    """Control flow on values: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else x


@pytest.mark.parametrize("net_class", [SharedConvOutput, DataDependent])
def test_what_cannot_fold_is_left_as_it_is(net_class):
    net = with_random_statistics(net_class())
    assert fold_batchnorm(net) == 0 and isinstance(net.bn, nn.BatchNorm2d)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A digits teacher with BatchNorm statistics that are not the identity."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    net = with_random_statistics(create_model("digits_cnn_l", 10, 1), seed=1)
    save_model_file(path, "digits_cnn_l", 10, 1, net.state_dict())
    return str(path)


def runners(method, teacher_file, **kwargs):
    data = load_dataset(DataConfig())
    role = Role("teacher", "digits_cnn_l", checkpoint=teacher_file)
    made = [RoleRunner(role, 0, method, data, OptimConfig(), 0, CPU, 1, fold_frozen_batchnorm=fold, **kwargs)
            for fold in (False, True)]
    return made, data


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_frozen_teacher_runs_folded_and_checkpoints_as_loaded(teacher_file, channels_last):
    (plain, folded), data = runners(KD(KDParams()), teacher_file, channels_last=channels_last)
    assert batchnorms(plain.net) == 4 and batchnorms(folded.net) == 0
    x, y = next(seeded_batches(data, 32, 0, 0))
    (out, published), (out_f, published_f) = plain.forward(x, y), folded.forward(x, y)
    assert torch.allclose(published["logits"], published_f["logits"], atol=1e-5)
    assert plain.correct(x, y) == folded.correct(x, y)
    # A checkpoint holds the backbone as loaded: the same keys and values as the plain runner's
    state, state_f = plain.state_dict()["net"], folded.state_dict()["net"]
    assert state.keys() == state_f.keys() and all(torch.equal(state[k], state_f[k]) for k in state)
    # ... and reads back folded again, from either kind of runner
    folded.load_state_dict(plain.state_dict())
    assert batchnorms(folded.net) == 0
    assert torch.allclose(folded.forward(x, y)[1]["logits"], published["logits"], atol=1e-5)


def test_a_backbone_that_trains_or_keeps_batchnorm_in_train_mode_is_not_folded(teacher_file):
    data = load_dataset(DataConfig())
    student = RoleRunner(Role("student_0", "digits_cnn_s"), 1, KD(KDParams()), data, OptimConfig(), 0, CPU, 1,
                         fold_frozen_batchnorm=True)
    assert student.loaded_backbone is None and batchnorms(student.net) == 3
    (_, bn_train), _ = runners(SOKD(SOKDParams(teacher_bn="train")), teacher_file)
    assert bn_train.loaded_backbone is None and batchnorms(bn_train.net.backbone) == 4
    (plain, folded), _ = runners(SOKD(SOKDParams()), teacher_file)  # the bridge trains; the backbone folds
    assert batchnorms(folded.net.backbone) == 0 and folded.trains
    assert [p.shape for p in folded.recipe.optimizer.param_groups[0]["params"]] == \
        [p.shape for p in plain.recipe.optimizer.param_groups[0]["params"]]
