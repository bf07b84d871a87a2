"""MTKD-SSR, LW-KD (with its synthesized dataset) and Teacher-free KD: losses against their formulas,
where the gradients go, stage-pairing errors, and the same run on Ray as in one process."""

import math
import time

import pytest
import torch
import torch.nn.functional as F
from equivalence import assert_same_run, run_both
from formulas import STEP, build_role, direct_ce, direct_st

from ray_kd import synthetic
from ray_kd.checkpoint import save_model_file, safe_load
from ray_kd.config import ConfigError, DataConfig, OptimConfig, load_config
from ray_kd.data import seeded_batches
from ray_kd.datasets import load_dataset
from ray_kd.methods import Role
from ray_kd.methods.kd import KD, KDParams
from ray_kd.methods.lwkd import LWKD, LWKDParams, SyntheticDraws
from ray_kd.methods.mtkd_ssr import MTKDParams, MTKDSSR
from ray_kd.methods.tfkd import TFKD, TFKDParams
from ray_kd.models import create_model
from ray_kd.roles import RoleRunner
from ray_kd.run import preflight

CPU = torch.device("cpu")
STUDENT, TEACHER = Role("student_0", "digits_cnn_s"), Role("teacher", "digits_cnn_l")


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- MTKD-SSR -----------------------------------------------------------------
Y = torch.tensor([1, 0, 2])


def mtkd_tensors():
    """Student digits_cnn_s (2 stages: 16, 32 channels); teacher with 3 stages (48, 64, 64)."""
    student = {"logits": rand(3, 3, seed=1), "head0": rand(3, 3, seed=2), "head1": rand(3, 3, seed=3),
               "channels0": rand(3, 16, seed=4), "channels1": rand(3, 32, seed=5)}
    teacher = {"logits": rand(3, 3, seed=6), **{f"head{i}": rand(3, 3, seed=7 + i) for i in range(3)},
               "channels0": rand(3, 48, seed=10), "channels1": rand(3, 64, seed=11), "channels2": rand(3, 64, seed=12)}
    return student, teacher


def mtkd_student(**params):
    return build_role(MTKDSSR(MTKDParams(stage_alignment="deepest", **params)), STUDENT)


def test_mtkd_student_terms_match_formulas():
    student = mtkd_student(temperature=4.0, scd_temperature=2.0, ce_weight=0.5, head_ce_weight=0.3,
                           scd_weight=0.7, srd_weight=0.2, crd_weight=0.9)
    s, t = mtkd_tensors()
    terms = student.losses(s, {"teacher": t}, Y, STEP)
    # deepest alignment: student stage i pairs with teacher stage i + 1
    assert float(terms["ce"]) == pytest.approx(0.5 * direct_ce(s["logits"], Y), abs=1e-5)
    head_ce = (direct_ce(s["head0"], Y) + direct_ce(s["head1"], Y)) / 2
    assert float(terms["head_ce"]) == pytest.approx(0.3 * head_ce, abs=1e-5)
    srd = (direct_st(s["head0"], t["head1"], 4) + direct_st(s["head1"], t["head2"], 4)
           + direct_st(s["logits"], t["logits"], 4)) / 3
    assert float(terms["srd"]) == pytest.approx(0.2 * srd, abs=1e-5)
    crd = ((direct_st(s["head0"], s["head1"], 4) + direct_st(s["head0"], s["logits"], 4)) / 2
           + direct_st(s["head1"], s["logits"], 4)) / 2
    assert float(terms["crd"]) == pytest.approx(0.9 * crd, abs=1e-5)
    # the adapters start at zero: the student's channel distribution starts uniform
    uniform = [torch.zeros_like(t["channels1"]), torch.zeros_like(t["channels2"])]
    scd = (direct_st(uniform[0], t["channels1"], 2) + direct_st(uniform[1], t["channels2"], 2)) / 2
    assert float(terms["scd"]) == pytest.approx(0.7 * scd, abs=1e-5)
    assert float(terms["total"]) == pytest.approx(sum(float(v) for k, v in terms.items() if k != "total"), abs=1e-5)
    # with known adapter weights, SCD compares softmax(W d_S + b) with the teacher's descriptor
    adapters = student.extras["adapters"]
    with torch.no_grad():
        for i, adapter in enumerate(adapters):
            adapter.weight.copy_(rand(*adapter.weight.shape, seed=20 + i))
            adapter.bias.copy_(rand(*adapter.bias.shape, seed=30 + i))
    terms = student.losses(s, {"teacher": t}, Y, STEP)
    widened = [s[f"channels{i}"] @ adapters[i].weight.T + adapters[i].bias for i in range(2)]
    scd = (direct_st(widened[0], t["channels1"], 2) + direct_st(widened[1], t["channels2"], 2)) / 2
    assert float(terms["scd"]) == pytest.approx(0.7 * scd, abs=1e-5)


def test_mtkd_weight_zero_turns_a_term_off_and_teacher_heads_learn_from_labels():
    method = MTKDSSR(MTKDParams(stage_alignment="deepest", scd_weight=0.0, crd_weight=0.0, srd_final=False,
                                srd_weight=1.0))
    s, t = mtkd_tensors()
    terms = build_role(method, STUDENT).losses(s, {"teacher": t}, Y, STEP)
    assert set(terms) == {"ce", "head_ce", "srd", "total"}
    assert float(terms["srd"]) == pytest.approx((direct_st(s["head0"], t["head1"], 4)
                                                 + direct_st(s["head1"], t["head2"], 4)) / 2, abs=1e-5)
    teacher_terms = build_role(method, TEACHER).losses(t, {"teacher": t}, Y, STEP)
    want = sum(direct_ce(t[f"head{i}"], Y) for i in range(3)) / 3
    assert set(teacher_terms) == {"head_ce", "total"}
    assert float(teacher_terms["total"]) == pytest.approx(want, abs=1e-5)


def test_mtkd_with_a_final_weight_of_its_own_contains_kd_exactly():
    s, t = mtkd_tensors()
    mtkd = build_role(MTKDSSR(MTKDParams(stage_alignment="deepest", ce_weight=0.1, srd_final_weight=0.9,
                                         head_ce_weight=0, scd_weight=0, srd_weight=0, crd_weight=0)), STUDENT)
    kd = build_role(KD(KDParams(temperature=4.0, ce_weight=0.1, kd_weight=0.9)), STUDENT)
    got = mtkd.losses(s, {"teacher": t}, Y, STEP)
    want = kd.losses({"logits": s["logits"]}, {"teacher": t}, Y, STEP)
    assert set(got) == {"ce", "srd_final", "total"}
    assert float(got["total"]) == pytest.approx(float(want["total"]), abs=1e-6)
    both = build_role(MTKDSSR(MTKDParams(stage_alignment="deepest", srd_final_weight=0.5)), STUDENT)
    terms = both.losses(s, {"teacher": t}, Y, STEP)  # the final pair leaves SRD's mean for a term of its own
    srd = (direct_st(s["head0"], t["head1"], 4) + direct_st(s["head1"], t["head2"], 4)) / 2
    assert float(terms["srd"]) == pytest.approx(srd, abs=1e-5)
    assert float(terms["srd_final"]) == pytest.approx(0.5 * direct_st(s["logits"], t["logits"], 4), abs=1e-5)


def test_mtkd_publishes_logits_and_descriptors_never_maps():
    method = MTKDSSR(MTKDParams(stage_alignment="deepest"))
    data = load_dataset(DataConfig())
    teacher = RoleRunner(TEACHER, 0, method, data, OptimConfig(), 0, CPU, steps_per_epoch=1)
    student = RoleRunner(STUDENT, 1, method, data, OptimConfig(), 0, CPU, steps_per_epoch=1)
    x, y = next(seeded_batches(data, 16, 0, 0))
    _, published = teacher.forward(x, y)
    assert all(t.dim() == 2 and t.shape[0] == 16 and not t.requires_grad for t in published.values())
    assert {k: v.shape[1] for k, v in published.items() if k.startswith("channels")} == \
        {"channels0": 48, "channels1": 64, "channels2": 64}
    assert set(student.forward(x, y)[1]) == {"logits"}


def test_mtkd_gradients_reach_heads_adapters_and_student_but_not_the_frozen_teacher():
    method = MTKDSSR(MTKDParams(stage_alignment="deepest"))
    data = load_dataset(DataConfig())
    teacher = RoleRunner(TEACHER, 0, method, data, OptimConfig(), 0, CPU, steps_per_epoch=1)
    student = RoleRunner(STUDENT, 1, method, data, OptimConfig(), 0, CPU, steps_per_epoch=1)
    frozen = {k: v.clone() for k, v in teacher.net.backbone.state_dict().items()}

    x, y = next(seeded_batches(data, 32, 0, 0))
    outputs, published = {}, {}
    for r in (teacher, student):
        outputs[r.role.name], published[r.role.name] = r.forward(x, y)
    for r in (teacher, student):
        r.update(outputs[r.role.name], published, y, epoch=0)
    assert all(p.grad is None for p in teacher.net.backbone.parameters())
    for name, tensor in teacher.net.backbone.state_dict().items():  # weights and BN statistics
        torch.testing.assert_close(tensor, frozen[name])
    for head in teacher.net.extras["heads"]:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    for part in (student.net.backbone, *student.net.extras["heads"], *student.net.extras["adapters"]):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part
    # once the adapters have moved off zero, SCD alone pushes on the student's backbone
    student.net.params = MTKDParams(stage_alignment="deepest", ce_weight=0, head_ce_weight=0, srd_weight=0,
                                    crd_weight=0)
    x, y = next(seeded_batches(data, 32, 0, 1))
    student.net.zero_grad()
    terms = student.net.losses(student.net(x, y), {"teacher": teacher.forward(x, y)[1]}, y, STEP)
    terms["scd"].backward()
    assert student.net.backbone.stages[0][0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("teacher,student,alignment,fix", [
    ("vgg13", "resnet8", "strict", "stage_alignment=deepest"),
    ("digits_cnn_l", "digits_cnn_s", "strict", "stage_alignment=deepest"),
    ("resnet8", "vgg8", "deepest", "at most 3 stages"),
])
def test_mtkd_rejects_pairs_it_cannot_map(teacher, student, alignment, fix):
    cfg = load_config(None, ["method.name=mtkd_ssr", f"method.stage_alignment={alignment}",
                             f"teacher={{model: {teacher}, checkpoint: none.pt}}", f"students=[{{model: {student}}}]"])
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    assert teacher in str(err.value) and student in str(err.value) and fix in str(err.value)


def test_mtkd_accepts_matching_and_shallower_students():
    MTKDSSR(MTKDParams()).check_roles([Role("teacher", "wrn_40_2"), Role("student_0", "shufflenetv1")], 100, 3)
    MTKDSSR(MTKDParams()).check_roles([Role("teacher", "vgg13"), Role("student_0", "mobilenetv2")], 100, 3)
    MTKDSSR(MTKDParams(stage_alignment="deepest")).check_roles([TEACHER, STUDENT], 10, 1)


# --- the synthesized dataset ---------------------------------------------------
def test_synthetic_is_deterministic_per_seed_and_has_k_classes():
    a = synthetic.make_splits(classes=100, size=8, per_class=5, seed=3)
    b = synthetic.make_splits(classes=100, size=8, per_class=5, seed=3)
    c = synthetic.make_splits(classes=100, size=8, per_class=5, seed=4)
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[1][0], b[1][0])
    assert not torch.equal(a[0][0], c[0][0])
    (train_x, train_y), (test_x, test_y) = a
    assert train_x.shape == (500, 1, 8, 8) and train_x.dtype == torch.uint8 and test_x.shape == (100, 1, 8, 8)
    assert torch.equal(train_y.unique(), torch.arange(100)) and torch.equal(test_y.unique(), torch.arange(100))
    assert [synthetic.digits_per_class(k) for k in (2, 10, 11, 100, 1000)] == [1, 1, 2, 2, 3]


def test_synthetic_dataset_choice_loads_with_fixed_normalisation():
    data = load_dataset(load_config(None, {"data.dataset": "synthetic", "data.synthetic": {
        "classes": 7, "size": 12, "per_class": 20}}).data)
    assert data.num_classes == 7 and data.in_channels == 1 and data.train.images.shape[-1] == 12
    assert data.augment == "none"
    images = data.val.images[:4]
    torch.testing.assert_close(data.normalize(images), synthetic.normalize(images), rtol=0, atol=0)
    for bad, says in ((["data.synthetic.classes=ten"], "data.synthetic.classes"),
                      (["data.synthetic.colour=3"], "data.synthetic.colour: unknown key"),
                      (["data.synthetic.size=2"], "data.synthetic.size"),
                      (["data.root=classes=10,size=8"], "the synthetic dataset has no root")):
        with pytest.raises(ConfigError, match=says):
            load_config(None, ["data.dataset=synthetic", *bad])


def train_quickly(model: str, data, steps: int) -> tuple[torch.nn.Module, float, float]:
    """A few SGD steps of cross-entropy; returns the net, its test top-1 and the seconds it took."""
    torch.manual_seed(0)
    net = create_model(model, data.num_classes, data.in_channels)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    start, step = time.perf_counter(), 0
    while step < steps:
        for x, y in seeded_batches(data, 64, 0, step):
            loss = F.cross_entropy(net(x)[0], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    seconds = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        acc = float((net(data.normalize(data.test.images))[0].argmax(1) == data.test.labels).float().mean())
    return net, acc, seconds


@pytest.fixture(scope="session")
def lwkd_teacher(tmp_path_factory):
    """A digits_cnn_l trained briefly on 10 synthesized classes at 8x8: LW-KD's teacher for the digits."""
    data = load_dataset(load_config(None, {"data.dataset": "synthetic", "data.synthetic": {
        "classes": 10, "size": 8, "per_class": 150}}).data)
    net, acc, seconds = train_quickly("digits_cnn_l", data, steps=100)
    path = tmp_path_factory.mktemp("lwkd") / "teacher.pt"
    save_model_file(path, "digits_cnn_l", 10, synthetic.CHANNELS, net.state_dict())
    return str(path), acc, seconds


@pytest.fixture(scope="session")
def mtkd_teacher(tmp_path_factory):
    """A digits_cnn_l trained briefly on the digits (equivalence needs a teacher file, not a good one)."""
    net, _, _ = train_quickly("digits_cnn_l", load_dataset(DataConfig()), steps=30)
    path = tmp_path_factory.mktemp("mtkd") / "teacher.pt"
    save_model_file(path, "digits_cnn_l", 10, 1, net.state_dict())
    return str(path)


def test_a_small_teacher_learns_the_synthetic_set_quickly(lwkd_teacher):
    _, acc, seconds = lwkd_teacher
    assert acc > 0.9, acc
    assert seconds < 30


# --- LW-KD ---------------------------------------------------------------------
Z_S = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [0.3, 0.2, 0.1]])
Z_T = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.5], [0.0, 4.0, 0.0]])


def test_lwkd_terms_match_formulas():
    method = LWKD(LWKDParams(temperature=4.0, alpha=0.7, adv_weight=0.2, adv_temperature=2.0, disc_weight=0.5))
    torch.manual_seed(0)
    student = build_role(method, STUDENT)
    d = student.extras["discriminator"]
    terms = student.losses({"logits": Z_S}, {"teacher": {"logits": Z_T}}, Y, STEP)

    def disc(z):  # D by hand: Linear -> LeakyReLU(0.2) -> Linear on softmax(z / 2)
        h = F.softmax(z / 2.0, dim=1) @ d[0].weight.T + d[0].bias
        return torch.where(h > 0, h, 0.2 * h) @ d[2].weight.T + d[2].bias

    def log_sigmoid(v):
        return [-math.log1p(math.exp(-x)) for x in v.flatten().tolist()]

    assert float(terms["ce"]) == pytest.approx(0.3 * direct_ce(Z_S, Y), abs=1e-5)
    assert float(terms["kd"]) == pytest.approx(0.7 * direct_st(Z_S, Z_T, 4.0), abs=1e-5)
    adv = -sum(log_sigmoid(disc(Z_S))) / 3
    assert float(terms["adv"]) == pytest.approx(0.2 * adv, abs=1e-5)
    real, fake = -sum(log_sigmoid(disc(Z_T))) / 3, -sum(log_sigmoid(-disc(Z_S))) / 3
    assert float(terms["disc"]) == pytest.approx(0.5 * (real + fake) / 2, abs=1e-5)
    off = build_role(LWKD(LWKDParams(adv_weight=0.0)), STUDENT).losses(
        {"logits": Z_S}, {"teacher": {"logits": Z_T}}, Y, STEP)
    assert set(off) == {"ce", "kd", "total"}


def test_lwkd_one_backward_trains_each_side_on_its_own_loss():
    """The student's adversarial loss never moves D; D's loss never moves the student."""
    student = build_role(LWKD(LWKDParams()), STUDENT)
    d = student.extras["discriminator"]
    z = Z_S.clone().requires_grad_(True)
    terms = student.losses({"logits": z}, {"teacher": {"logits": Z_T}}, Y, STEP)
    terms["adv"].backward(retain_graph=True)
    assert z.grad.abs().sum() > 0 and all(p.grad is None for p in d.parameters())
    z.grad = None
    terms["disc"].backward(retain_graph=True)
    assert z.grad is None and all(p.grad.abs().sum() > 0 for p in d.parameters())
    disc_grads = [p.grad.clone() for p in d.parameters()]
    d.zero_grad()
    terms["total"].backward()
    for p, want in zip(d.parameters(), disc_grads):
        torch.testing.assert_close(p.grad, want)


def test_lwkd_teacher_sees_fresh_synthesized_samples_and_stays_frozen():
    method = LWKD(LWKDParams())
    data = load_dataset(DataConfig())
    teacher = RoleRunner(TEACHER, 0, method, data, OptimConfig(), 0, CPU, steps_per_epoch=1)
    student = RoleRunner(STUDENT, 1, method, data, OptimConfig(), 0, CPU, steps_per_epoch=1)
    assert not teacher.trains and teacher.net.backbone.stem[0].in_channels == synthetic.CHANNELS
    x, y = next(seeded_batches(data, 32, 0, 0))
    first, published = teacher.forward(x, y)
    second, _ = teacher.forward(x, y)
    assert first["logits"].shape == (32, 10) and not torch.equal(first["logits"], second["logits"])
    assert int(teacher.net.extras["draws"].draws) == 2
    outputs, _ = student.forward(x, y)
    student.update(outputs, {"teacher": published}, y, epoch=0)
    assert all(p.grad is None for p in teacher.net.backbone.parameters())
    for part in (student.net.backbone, student.net.extras["discriminator"]):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert teacher.evaluate(data) == {} and "student_0/val_acc" in student.evaluate(data)
    # the same seed and step draw the same pixels; the next step draws new ones
    a, b = SyntheticDraws(10, seed=5), SyntheticDraws(10, seed=5)
    drawn = a(y, 8)
    torch.testing.assert_close(drawn, b(y, 8))
    assert not torch.equal(drawn, a(y, 8))


# --- Teacher-free KD -----------------------------------------------------------
def test_tfkd_matches_its_fixed_target():
    terms = build_role(TFKD(TFKDParams(temperature=2.0, alpha=0.6, correct_prob=0.8)), STUDENT).losses(
        {"logits": Z_S}, {}, Y, STEP)
    rest = math.log(0.2 / 2)
    target = torch.tensor([[rest, math.log(0.8), rest], [math.log(0.8), rest, rest], [rest, rest, math.log(0.8)]])
    assert float(terms["ce"]) == pytest.approx(0.4 * direct_ce(Z_S, Y), abs=1e-5)
    assert float(terms["kd"]) == pytest.approx(0.6 * direct_st(Z_S, target, 2.0), abs=1e-5)
    at_t1 = build_role(TFKD(TFKDParams(temperature=1.0, alpha=1.0, correct_prob=0.8)), STUDENT).losses(
        {"logits": Z_S}, {}, Y, STEP)
    q = target.exp()
    assert q.sum(1).tolist() == pytest.approx([1.0, 1.0, 1.0])
    want = float((q * (q.log() - F.log_softmax(Z_S, 1))).sum(1).mean())
    assert float(at_t1["kd"]) == pytest.approx(want, abs=1e-5)


# --- the same run on Ray and in one process ------------------------------------
def test_mtkd_ssr_same_on_ray_and_local(ray_cluster, tmp_path, mtkd_teacher):
    local, remote = run_both(tmp_path, ["method.name=mtkd_ssr", "method.stage_alignment=deepest",
                                        f"teacher={{model: digits_cnn_l, checkpoint: {mtkd_teacher}}}",
                                        "students=[{model: digits_cnn_s}]"], steps=4)
    assert_same_run(local, remote, ["teacher", "student_0"])
    start = torch.load(mtkd_teacher, weights_only=True)["state_dict"]
    end = safe_load(remote / "teacher.pt")["net"]
    for name, tensor in start.items():  # the backbone stays frozen; only the teacher's heads trained
        torch.testing.assert_close(end[f"backbone.{name}"], tensor)
    assert any(k.startswith("extras.heads.") for k in end)


def test_lwkd_same_on_ray_and_local(ray_cluster, tmp_path, lwkd_teacher):
    local, remote = run_both(tmp_path, ["method.name=lwkd",
                                        f"teacher={{model: digits_cnn_l, checkpoint: {lwkd_teacher[0]}}}",
                                        "students=[{model: digits_cnn_s}]"], steps=4)
    assert_same_run(local, remote, ["teacher", "student_0"])
    assert int(safe_load(remote / "teacher.pt")["net"]["extras.draws.draws"]) == 8  # 2 epochs x 4 steps
