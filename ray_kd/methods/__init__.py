"""The distillation methods. Importing this package registers the built-in ones (see `registry`)."""

from ray_kd.methods import ce, dml, kd, lwkd, mtkd_ssr, skd, sokd, tfkd  # noqa: F401  (registers them)
from ray_kd.methods.base import FrozenTeacher, Method, MethodParams, Outputs, Role, RoleModule, Step, Terms
from ray_kd.methods.registry import (METHODS, WRAPPERS, list_methods, method_class, register_method,
                                     register_wrapper)

__all__ = ["METHODS", "WRAPPERS", "FrozenTeacher", "Method", "MethodParams", "Outputs", "Role", "RoleModule",
           "Step", "Terms", "list_methods", "method_class", "register_method", "register_wrapper"]
