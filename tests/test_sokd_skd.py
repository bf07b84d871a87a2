"""SOKD and SKD: losses against hand-written formulas, where gradients go, the teacher's BN modes,
the SKD compositions, and the same run on Ray as in one process."""

import json
import math

import pytest
import torch
from equivalence import assert_same_run, run_both, run_local
from formulas import STEP, build_role, direct_st
from test_losses import Y, Z_S, Z_T

from ray_kd.checkpoint import safe_load
from ray_kd.config import ConfigError, DataConfig, OptimConfig, load_config
from ray_kd.data import seeded_batches
from ray_kd.datasets import load_dataset
from ray_kd.methods import Role, method_class
from ray_kd.methods.sokd import SOKD, SOKDParams
from ray_kd.roles import RoleRunner

T = 4.0
Z_A = torch.tensor([[0.5, 1.5, -1.0], [2.0, 0.0, 0.5]])
Z_3 = torch.tensor([[0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
TEACHER, STUDENT = Role("teacher", "digits_cnn_l"), Role("student_0", "digits_cnn_s")


def direct_ce(z, y):
    """mean_b -log softmax(z_b)[y_b], written out by hand."""
    rows = [math.log(sum(math.exp(v) for v in row)) - row[label] for row, label in zip(z.tolist(), y.tolist())]
    return sum(rows) / len(rows)


def direct_attention(u, simplifier):
    """s_i = u_i + sum_j softmax_j(q_i . k_j / sqrt(d)) v_j, one row at a time."""
    q, k, v = simplifier.query(u), simplifier.key(u), simplifier.value(u)
    rows = []
    for i in range(len(u)):
        scores = [float(q[i] @ k[j]) / math.sqrt(q.shape[1]) for j in range(len(u))]
        weights = [math.exp(s) / sum(math.exp(t) for t in scores) for s in scores]
        rows.append(u[i] + sum(w * v[j] for j, w in enumerate(weights)))
    return torch.stack(rows)


def runners_for(method, roles, seed=0):
    data = load_dataset(DataConfig())
    return data, [RoleRunner(role, i, method, data, OptimConfig(), seed, torch.device("cpu"), steps_per_epoch=1)
                  for i, role in enumerate(roles)]


def step(runners, x, y):
    """One lockstep step as the session runs it: every forward, the exchange, every update."""
    outputs, published = {}, {}
    for r in runners:
        outputs[r.role.name], published[r.role.name] = r.forward(x, y)
    return {r.role.name: r.update(outputs[r.role.name], published, y, epoch=0) for r in runners}


def one_batch(data, size=32):
    return next(seeded_batches(data, size, seed=0, epoch=0))


def skd(base, **params):
    cls = method_class(f"{base}+skd")
    return cls(cls.Params(**params))


# --- SOKD --------------------------------------------------------------------------------------

def test_sokd_bridge_loss_matches_formula():
    method = SOKD(SOKDParams(bridge_ce_weight=0.5, bridge_teacher_weight=2.0, bridge_student_weight=3.0))
    published = {"teacher": {"bridge": Z_A}, "student_0": {"logits": Z_S}, "student_1": {"logits": Z_3}}
    terms = build_role(method, TEACHER).losses({"logits": Z_T, "bridge": Z_A}, published, Y, STEP)
    assert float(terms["bridge_ce"]) == pytest.approx(0.5 * direct_ce(Z_A, Y), abs=1e-6)
    assert float(terms["bridge_teacher"]) == pytest.approx(2.0 * direct_st(Z_A, Z_T, T), abs=1e-5)
    assert float(terms["bridge_student"]) == pytest.approx(
        3.0 * (direct_st(Z_A, Z_S, T) + direct_st(Z_A, Z_3, T)) / 2, abs=1e-5)
    assert float(terms["total"]) == pytest.approx(
        float(terms["bridge_ce"] + terms["bridge_teacher"] + terms["bridge_student"]), abs=1e-6)


def test_sokd_student_learns_from_the_bridge():
    method = SOKD(SOKDParams(ce_weight=0.7, kd_weight=1.5))
    student, teacher = build_role(method, STUDENT), build_role(method, TEACHER)
    terms = student.losses({"logits": Z_S}, {"teacher": {"bridge": Z_A}, "student_0": {"logits": Z_S}}, Y, STEP)
    assert float(terms["ce"]) == pytest.approx(0.7 * direct_ce(Z_S, Y), abs=1e-6)
    assert float(terms["kd"]) == pytest.approx(1.5 * direct_st(Z_S, Z_A, T), abs=1e-5)
    sent = teacher.publish({"logits": Z_T, "bridge": Z_A.clone().requires_grad_(True)})
    assert sent.keys() == {"bridge"} and not sent["bridge"].requires_grad  # z_T and the feature map stay home
    assert teacher.eval_heads({"logits": Z_T, "bridge": Z_A}).keys() == {"teacher", "bridge"}


def test_sokd_bridge_and_students_train_and_the_teacher_backbone_does_not():
    data, (teacher, *students) = runners_for(SOKD(SOKDParams()), [TEACHER, STUDENT, Role("student_1", "digits_cnn_s")])
    bridge, backbone = teacher.net.extras["bridge"], teacher.net.backbone
    fresh, trained = bridge.stage.state_dict(), backbone.stages[-1].state_dict()
    assert fresh.keys() == trained.keys() and any(not torch.equal(fresh[k], trained[k]) for k in fresh)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    bridge_before = {k: v.clone() for k, v in bridge.state_dict().items()}
    losses = step([teacher, *students], *one_batch(data))
    assert set(losses["teacher"]) == {"bridge_ce", "bridge_teacher", "bridge_student", "total"}
    for name, p in bridge.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for s in students:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in s.net.parameters())
    trainable = {id(p) for group in teacher.optimizer.param_groups for p in group["params"]}
    assert trainable == {id(p) for p in bridge.parameters()}
    for p in backbone.parameters():
        assert not p.requires_grad and p.grad is None and p not in teacher.optimizer.state
    for name, tensor in backbone.state_dict().items():  # weights and BN statistics alike
        torch.testing.assert_close(tensor, before[name])
    assert any(not torch.equal(v, bridge_before[k]) for k, v in bridge.state_dict().items())


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_sokd_teacher_bn_mode(mode):
    data, (teacher, student) = runners_for(SOKD(SOKDParams(teacher_bn=mode)), [TEACHER, STUDENT])
    backbone = teacher.net.backbone
    stats = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k}
    weights = {k: p.clone() for k, p in backbone.named_parameters()}
    step([teacher, student], *one_batch(data))
    moved = [k for k, v in stats.items() if not torch.equal(v, backbone.state_dict()[k])]
    assert (len(moved) > 0) == (mode == "train")
    for name, p in backbone.named_parameters():  # frozen either way
        assert p.grad is None and p not in teacher.optimizer.state
        torch.testing.assert_close(p, weights[name])


# --- SKD ---------------------------------------------------------------------------------------

def test_skd_loss_matches_formula():
    student = build_role(skd("kd", temperature=T, ce_weight=0.1, kd_weight=0.9, simplifier_ce_weight=0.5), STUDENT)
    simplifier = student.extras["simplifier"]
    torch.manual_seed(1)
    torch.nn.init.normal_(simplifier.value.weight)  # away from the identity start
    terms = student.losses({"logits": Z_S}, {"teacher": {"logits": Z_T}}, Y, STEP)
    s = direct_attention(Z_T / T, simplifier).detach()
    assert float(terms["ce"]) == pytest.approx(0.1 * direct_ce(Z_S, Y), abs=1e-6)
    # softmax(T*s / T) = softmax(s): the simplified logits as a target at temperature T
    assert float(terms["kd"]) == pytest.approx(0.9 * direct_st(Z_S, T * s, T), abs=1e-5)
    assert float(terms["simplifier_ce"]) == pytest.approx(0.5 * direct_ce(s, Y), abs=1e-6)
    assert float(terms["total"]) == pytest.approx(float(terms["ce"] + terms["kd"] + terms["simplifier_ce"]), abs=1e-6)


def test_skd_starts_as_its_base_method():
    """The base's terms unchanged at the identity start; the default anti-collapse term comes on top."""
    method, base = skd("kd"), method_class("kd")(method_class("kd").Params())
    published = {"teacher": {"logits": Z_T}}
    got = build_role(method, STUDENT).losses({"logits": Z_S}, published, Y, STEP)
    want = build_role(base, STUDENT).losses({"logits": Z_S}, published, Y, STEP)
    assert got.keys() == want.keys() | {"simplifier_ce"}
    assert float(got["simplifier_ce"]) == pytest.approx(0.6 * direct_ce(Z_T / T, Y), abs=1e-6)
    for name in want.keys() - {"total"}:
        assert float(got[name]) == pytest.approx(float(want[name]), abs=1e-6)
    assert float(got["total"]) == pytest.approx(float(want["total"] + got["simplifier_ce"]), abs=1e-6)


def test_skd_simplifier_learns_from_the_distillation_loss_alone():
    grads = {}
    for scale in (None, 1.0):
        torch.manual_seed(1)
        student = build_role(skd("kd", simplifier_grad_scale=scale), STUDENT)
        simplifier = student.extras["simplifier"]
        torch.nn.init.normal_(simplifier.value.weight)
        z_s, z_t = Z_S.clone().requires_grad_(True), Z_T.clone().requires_grad_(True)
        student.losses({"logits": z_s}, {"teacher": {"logits": z_t}}, Y, STEP)["kd"].backward()
        assert z_s.grad.abs().sum() > 0 and z_t.grad is None  # never into the teacher
        grads[scale] = {name: p.grad.clone() for name, p in simplifier.named_parameters()}
        assert all(g.abs().sum() > 0 for g in grads[scale].values())
    for name, g in grads[None].items():  # default: the plain KL's gradient, 1/T^2 of the T^2-scaled one
        torch.testing.assert_close(g, grads[1.0][name] / T**2)


def test_skd_compositions_merge_params_and_keep_the_base_roles():
    kd, dml, sokd = method_class("kd+skd"), method_class("dml+skd"), method_class("sokd+skd")
    assert (kd.name, kd.needs_teacher, dml.needs_teacher, dml.min_students) == ("kd+skd", True, False, 2)
    assert method_class("kd+skd") is kd
    assert {"temperature", "kd_weight", "simplifier_dim", "simplifier_residual"} <= set(kd.Params.model_fields)
    assert {"teacher_bn", "bridge_student_weight", "simplifier_ce_weight"} <= set(sokd.Params.model_fields)
    method = sokd(sokd.Params(simplifier_dim=2))
    teacher = build_role(method, TEACHER, num_classes=10)
    assert teacher.extras.keys() == {"bridge"}
    assert build_role(method, STUDENT, num_classes=10).extras["simplifier"].query.out_features == 2
    published = {"teacher": {"bridge": Z_A}, "student_0": {"logits": Z_S}}
    bridge_terms = teacher.losses({"logits": Z_T, "bridge": Z_A}, published, Y, STEP)  # the bridge is untouched
    assert float(bridge_terms["bridge_student"]) == pytest.approx(direct_st(Z_A, Z_S, T), abs=1e-5)
    for bad, says in ((["method.name=ce+skd"], "neither"), (["method.name=kd+skd+skd"], "already"),
                      (["method.name=kd+sk"], "unknown wrapper"),
                      (["method.name=dml+skd", "method.simplifier_dims=3"], "simplifier_dims")):
        with pytest.raises(ConfigError, match=says):
            load_config(None, bad)


@pytest.mark.parametrize("name", ["kd+skd", "sokd+skd", "dml+skd"])
def test_skd_composition_runs_an_epoch(name, tmp_path, digits_teacher):
    teacher = [] if name == "dml+skd" else [f"teacher={{model: digits_cnn_l, checkpoint: {digits_teacher}}}",
                                            "students=[{model: digits_cnn_s}, {model: digits_cnn_s}]"]
    cfg = load_config(None, [f"method.name={name}", "method.simplifier_ce_weight=0.1", *teacher,
                             "runtime.executor=local", "optim.epochs=1", "optim.steps_per_epoch=4",
                             f"output_dir={tmp_path}"])
    history = json.loads((run_local(cfg, show_progress=False) / "history.json").read_text())
    for student in ("student_0", "student_1"):
        assert math.isfinite(history[0][f"{student}/loss_kd"]) and f"{student}/loss_simplifier_ce" in history[0]
    assert ("bridge/val_acc" in history[0]) == (name == "sokd+skd")


# --- Ray == one process ------------------------------------------------------------------------

def test_sokd_same_on_ray_and_local(ray_cluster, tmp_path, digits_teacher):
    local, remote = run_both(tmp_path, ["method.name=sokd", f"teacher={{model: digits_cnn_l, checkpoint: {digits_teacher}}}",
                                        "students=[{model: digits_cnn_s}, {model: digits_cnn_s}]"])
    assert_same_run(local, remote, ["teacher", "student_0", "student_1"])
    history = json.loads((remote / "history.json").read_text())
    assert "bridge/val_acc" in history[-1] and "teacher/loss_bridge_student" in history[-1]
    teacher_start = torch.load(digits_teacher, weights_only=True)["state_dict"]
    teacher_end = safe_load(remote / "teacher.pt")["net"]
    for name, tensor in teacher_start.items():  # frozen backbone, BN statistics included (teacher_bn: eval)
        torch.testing.assert_close(teacher_end[f"backbone.{name}"], tensor)


def test_kd_skd_same_on_ray_and_local(ray_cluster, tmp_path, digits_teacher):
    local, remote = run_both(tmp_path, ["method.name=kd+skd", "method.simplifier_ce_weight=0.1",
                                        f"teacher={{model: digits_cnn_l, checkpoint: {digits_teacher}}}",
                                        "students=[{model: digits_cnn_s}]"])
    assert_same_run(local, remote, ["teacher", "student_0"])
    assert any(k.startswith("extras.simplifier.") for k in safe_load(remote / "student_0.pt")["net"])
