"""The losses written out by hand, element by element: what every method's loss test checks against,
and the one way those tests build a role's module (as the executors do, minus the optimiser)."""

import math

from ray_kd.methods import Method, Role, RoleModule, Step
from ray_kd.models import create_model

STEP = Step(step=0, epoch=0)


def build_role(method: Method, role: Role, num_classes: int = 3, in_channels: int = 1) -> RoleModule:
    """The module `method` runs for `role`, around a fresh backbone of `role.model`."""
    backbone = create_model(role.model, num_classes, method.input_channels(role, in_channels))
    return method.build_role(role, backbone, num_classes)


def direct_st(z_s, z_t, T):
    """T^2 * mean_b sum_c p_t (log p_t - log p_s), written out by hand."""
    total = 0.0
    for row_s, row_t in zip(z_s.tolist(), z_t.tolist()):
        ps = [math.exp(v / T) for v in row_s]
        pt = [math.exp(v / T) for v in row_t]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(t * (math.log(t) - math.log(s)) for s, t in zip(ps, pt))
    return T * T * total / len(z_s)


def direct_ce(z, y):
    """mean_b (logsumexp(z_b) - z_b[y_b])."""
    rows = zip(z.tolist(), y.tolist())
    return sum(math.log(sum(math.exp(v) for v in row)) - row[label] for row, label in rows) / len(y)
