"""The model zoo. Importing this package registers every family's builders."""

from ray_kd.models import (  # noqa: F401
    digits, mobilenetv2, resnet, shufflenetv1, shufflenetv2, vgg, wrn,
)
from ray_kd.models.base import StagedNet
from ray_kd.models.registry import create_model, list_models, model_origin, register_model

__all__ = ["StagedNet", "create_model", "list_models", "model_origin", "register_model"]
