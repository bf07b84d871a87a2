"""The model zoo: every registered model honours the StagedNet contract."""

import pytest
import torch

from ray_kd.models import StagedNet, create_model, list_models

EXPECTED = {
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "mobilenetv2", "shufflenetv1", "shufflenetv2",
    "digits_cnn_s", "digits_cnn_l",
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_family_is_registered():
    assert EXPECTED <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_forward_features_and_backward_on_cifar_shapes(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=100)
    assert isinstance(model, StagedNet)
    logits, features = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100)
    assert len(features) == len(model.stages) == len(model.stage_channels)
    for feature, channels in zip(features, model.stage_channels):
        assert feature.shape[:2] == (2, channels)
    logits.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_runs_on_one_channel_8x8(name):
    """CIFAR nets pool adaptively, so they also take sklearn-digits-sized inputs."""
    model = create_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        logits, features = model(torch.randn(4, 1, 8, 8))
    assert logits.shape == (4, 10)
    assert len(features) == len(model.stages)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="resnet20"):
        create_model("resnet9000", num_classes=10)


@pytest.mark.parametrize("name, expected", [("resnet20", 0.28e6), ("wrn_40_2", 2.2e6)])
def test_parameter_counts_match_the_reference_zoos(name, expected):
    assert n_params(create_model(name, num_classes=100)) == pytest.approx(expected, rel=0.15)


@pytest.mark.parametrize(
    "name, low, high", [("digits_cnn_s", 5e3, 10e3), ("digits_cnn_l", 50e3, 100e3)]
)
def test_digits_models(name, low, high):
    model = create_model(name, num_classes=10, in_channels=1)
    assert low <= n_params(model) <= high
    logits, features = model(torch.randn(4, 1, 8, 8))
    assert logits.shape == (4, 10)
    assert [f.shape[1] for f in features] == model.stage_channels
