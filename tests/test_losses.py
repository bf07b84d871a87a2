"""Each baseline loss on hand-made tensors against its formula; gradients go where they should."""


import torch
from formulas import STEP, build_role, direct_st

from ray_kd.methods import Role
from ray_kd.methods.dml import DML, DMLParams
from ray_kd.methods.kd import KD, KDParams
from ray_kd.methods.losses import soft_target


Z_S = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
Z_T = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.5]])
Y = torch.tensor([1, 2])


def test_soft_target_matches_formula():
    for T in (1.0, 4.0):
        assert abs(float(soft_target(Z_S, Z_T, T)) - direct_st(Z_S, Z_T, T)) < 1e-5
    assert float(soft_target(Z_T, Z_T, 4.0)) < 1e-6


def test_kd_loss_terms():
    method = KD(KDParams(temperature=4.0, ce_weight=0.1, kd_weight=0.9))
    student = build_role(method, Role("student_0", "digits_cnn_s"))
    terms = student.losses({"logits": Z_S}, {"teacher": {"logits": Z_T}}, Y, STEP)
    ce = float(torch.nn.functional.cross_entropy(Z_S, Y))
    assert abs(float(terms["ce"]) - 0.1 * ce) < 1e-6
    assert abs(float(terms["kd"]) - 0.9 * direct_st(Z_S, Z_T, 4.0)) < 1e-5
    assert abs(float(terms["total"]) - float(terms["ce"] + terms["kd"])) < 1e-6
    teacher = build_role(method, Role("teacher", "digits_cnn_l"))
    assert teacher.losses({"logits": Z_T}, {}, Y, STEP) == {} and not teacher.trainable_parameters()


def test_dml_averages_over_peers():
    z3 = torch.tensor([[0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    method = DML(DMLParams(temperature=1.0))
    published = {"student_0": {"logits": Z_S}, "student_1": {"logits": Z_T}, "student_2": {"logits": z3}}
    terms = build_role(method, Role("student_0", "digits_cnn_s")).losses({"logits": Z_S}, published, Y, STEP)
    want = (direct_st(Z_S, Z_T, 1.0) + direct_st(Z_S, z3, 1.0)) / 2
    assert abs(float(terms["kd"]) - want) < 1e-5


def test_soft_target_sends_no_gradient_to_the_target():
    z_s = Z_S.clone().requires_grad_(True)
    z_t = Z_T.clone().requires_grad_(True)
    soft_target(z_s, z_t, 4.0).backward()
    assert z_s.grad.abs().sum() > 0
    assert z_t.grad is None
