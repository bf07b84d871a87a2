"""torchvision/timm/factory models, weights from files any library writes, and methods on them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_streaming import make_tree

from ray_kd.checkpoint import CheckpointError, save_model_file
from ray_kd.config import ConfigError, DataConfig, OptimConfig, load_config
from ray_kd.data import eval_batches
from ray_kd.datasets import load_dataset
from ray_kd.methods import Role
from ray_kd.methods.mtkd_ssr import MTKDParams, MTKDSSR
from ray_kd.methods.sokd import SOKD, SOKDParams
from ray_kd.models import create_model
from ray_kd.roles import RoleRunner
from ray_kd.run import preflight, train
from ray_kd.weights import load_backbone

CLASSES = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny ImageFolder of 32x32 RGB noise with a class-dependent tint (3 classes, 12 + 4 images each)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for c in range(CLASSES):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 160, (32, 32, 3), dtype=np.uint8)
                pixels[..., c] += 90
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A torchvision resnet18 (3 classes) and its weights as `torch.save(model.state_dict())` writes them."""
    import torchvision

    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=CLASSES)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_each_kind_builds_with_its_stages():
    x = torch.randn(2, 3, 32, 32)
    for name, options, channels in [("torchvision:resnet18", {}, [64, 128, 256, 512]),
                                    ("timm:test_resnet", {}, [32, 48, 192, 96]),
                                    ("tiny_factory:tiny_convnet", {"stages": ["0", "1"]}, [8, 16]),
                                    ("tiny_factory:tiny_fixed_head", {}, [])]:
        net = create_model(name, 10, 3, **options)
        logits, features = net(x)
        assert logits.shape == (2, 10), name
        assert net.stage_channels == channels and [f.shape[1] for f in features] == channels, name
    digits_net = create_model("timm:test_resnet", 10, 1)  # timm takes in_chans: 1-channel 8x8 digits
    assert digits_net(torch.randn(2, 1, 8, 8))[0].shape == (2, 10)
    with pytest.raises(ValueError, match="takes 3-channel images but this dataset has 1"):
        create_model("torchvision:resnet18", 10, 1)


def _role(model, path, **fields):
    return Role("teacher", model, str(path), **fields)


def test_weights_from_library_files_give_the_same_logits(resnet18_file, tmp_path):
    from safetensors.torch import save_file

    x = torch.randn(2, 3, 32, 32)
    original, path = resnet18_file
    nets = {"torch.save": (original, path)}
    import timm

    timm_model = timm.create_model("test_resnet", num_classes=CLASSES).eval()
    save_file(timm_model.state_dict(), tmp_path / "test_resnet.safetensors")
    nets["safetensors"] = (timm_model, tmp_path / "test_resnet.safetensors")
    from tiny_factory import tiny_convnet

    factory_model = tiny_convnet(num_classes=CLASSES).eval()
    torch.save({"model": factory_model.state_dict(), "epoch": 3}, tmp_path / "script_checkpoint.pt")
    nets["dict with a model key"] = (factory_model, tmp_path / "script_checkpoint.pt")
    names = {"torch.save": "torchvision:resnet18", "safetensors": "timm:test_resnet",
             "dict with a model key": "tiny_factory:tiny_convnet"}
    for kind, (model, file) in nets.items():
        torch.manual_seed(123)  # another init than the file's
        net = load_backbone(_role(names[kind], file), CLASSES, 3).eval()
        with torch.no_grad():
            assert torch.allclose(net(x)[0], model(x), atol=1e-5), kind


def test_ray_kd_file_of_an_external_model_round_trips(tmp_path):
    net = create_model("timm:test_resnet", CLASSES, 3)
    save_model_file(tmp_path / "t.pt", "timm:test_resnet", CLASSES, 3, net.state_dict())
    loaded = load_backbone(_role("timm:test_resnet", tmp_path / "t.pt"), CLASSES, 3)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))


def test_imagenet_head_is_refused_or_replaced(tmp_path, capsys):
    import timm

    imagenet = timm.create_model("test_resnet", num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "in1k.pth")
    with pytest.raises(CheckpointError) as err:
        load_backbone(_role("timm:test_resnet", tmp_path / "in1k.pth"), 10, 3)
    assert "has a 1000-class head (model.fc.weight, model.fc.bias) but this run has 10 classes; " \
           "set teacher.replace_head=true" in str(err.value)
    net = load_backbone(_role("timm:test_resnet", tmp_path / "in1k.pth", replace_head=True), 10, 3)
    assert "replaced the 1000-class head of in1k.pth" in capsys.readouterr().out
    assert net.model.fc.out_features == 10
    assert torch.equal(net.model.layer4[0].conv1.weight, imagenet.layer4[0].conv1.weight)


def test_key_mismatch_is_one_line_with_counts(resnet18_file, tmp_path):
    state = dict(resnet18_file[0].state_dict())
    for key in ("layer4.1.bn2.weight", "layer4.1.bn2.bias", "conv1.weight", "fc.bias"):
        del state[key]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as err:
        load_backbone(_role("torchvision:resnet18", tmp_path / "broken.pth"), CLASSES, 3)
    msg = str(err.value)
    assert "\n" not in msg and "4 missing (model.conv1.weight, model.layer4.1.bn2.weight, " in msg
    assert "1 unexpected (model.extra.weight)" in msg
    with pytest.raises(CheckpointError, match="holds no state dict"):
        torch.save({"epoch": 3}, tmp_path / "no_weights.pt")
        load_backbone(_role("torchvision:resnet18", tmp_path / "no_weights.pt"), CLASSES, 3)


@pytest.mark.parametrize("model, expected", [
    ("torchvision:resnet9000", "config error at students.0.model: unknown model 'torchvision:resnet9000': "
                               "torchvision has no classification model"),
    ("timm:nope_net", "unknown model 'timm:nope_net': timm has no model"),
])
def test_unknown_external_model_is_refused_at_config_time(model, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"students.0.model={model}"])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_factory_that_cannot_be_imported_is_refused_at_preflight():
    """A factory is code: it is imported when the run is built (the preflight), never while validating."""
    cfg = load_config(None, ["students.0.model=no_such_pkg.mod:make"])
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    assert "config error at students.0: unknown model 'no_such_pkg.mod:make': cannot import 'make' from " \
           "'no_such_pkg.mod'" in str(err.value) and "\n" not in str(err.value)


def test_model_options_are_checked_at_config_time():
    for role, expected in [("{model: 'timm:test_resnet', model_kwargs: {pretrained: true}}", "may not set pretrained"),
                           ("{model: resnet8, stages: [layer1]}", "'resnet8' is built in: remove them")]:
        with pytest.raises(ConfigError, match=expected):
            load_config(None, [f"students=[{role}]"])


def test_torchvision_model_on_digits_is_refused_at_preflight():
    cfg = load_config(None, ["students=[{model: 'torchvision:resnet18'}]", "method.name=ce"])
    with pytest.raises(ConfigError, match="config error at students.0: model 'torchvision:resnet18' takes 3-channel"):
        preflight(cfg)


def test_feature_methods_refuse_unmappable_external_models_at_preflight(folder, resnet18_file):
    data = f"data={{dataset: imagefolder, root: {folder}}}"
    teacher = "teacher={{model: '{}', checkpoint: %s}}" % resnet18_file[1]
    cases = {
        ("mtkd_ssr", teacher.format("torchvision:resnet18"), "timm:test_vit"):
            "mtkd_ssr needs 1+ stage feature maps but student_0's model 'timm:test_vit' has no stage feature maps; "
            "set students.0.stages",
        ("sokd", teacher.format("torchvision:mobilenet_v3_small"), "timm:test_resnet"):
            "sokd copies the last stage of teacher's model 'torchvision:mobilenet_v3_small', but that stage "
            "does not run on the previous stage's output alone; set teacher.stages",
    }
    for (method, teacher_spec, student), expected in cases.items():
        cfg = load_config(None, [data, f"method.name={method}", teacher_spec, f"students=[{{model: '{student}'}}]"])
        with pytest.raises(ConfigError) as err:
            preflight(cfg)
        assert expected in str(err.value) and "\n" not in str(err.value)


def test_feature_methods_run_on_a_torchvision_teacher_and_timm_student(folder, resnet18_file):
    data = load_dataset(DataConfig(dataset="imagefolder", root=str(folder)))
    method = MTKDSSR(MTKDParams())
    roles = [Role("teacher", "torchvision:resnet18", str(resnet18_file[1])), Role("student_0", "timm:test_resnet")]
    method.check_roles(roles, data.num_classes, data.in_channels)
    teacher, student = (RoleRunner(r, i, method, data, OptimConfig(), 0, torch.device("cpu"), steps_per_epoch=1)
                        for i, r in enumerate(roles))
    x, y = data.normalize(data.train.images[:8]), data.train.labels[:8]
    outputs, published = {}, {}
    for runner in (teacher, student):
        outputs[runner.role.name], published[runner.role.name] = runner.forward(x, y)
    assert published["teacher"]["channels3"].shape == (8, 512)  # resnet18's layer4, through the adapter
    before = student.net.backbone.model.layer1[0].conv1.weight.clone()
    terms = student.update(outputs["student_0"], published, y, epoch=0)
    assert {"ce", "head_ce", "scd", "srd", "crd", "total"} <= set(terms)
    assert not torch.equal(before, student.net.backbone.model.layer1[0].conv1.weight)

    sokd = SOKD(SOKDParams())  # its bridge: a fresh copy of resnet18's layer4, fed layer3's map through the adapter
    sokd.check_roles(roles, data.num_classes, data.in_channels)
    bridge_teacher = RoleRunner(roles[0], 0, sokd, data, OptimConfig(), 0, torch.device("cpu"), steps_per_epoch=1)
    assert bridge_teacher.forward(x, y)[1]["bridge"].shape == (8, data.num_classes)


def test_kd_torchvision_teacher_to_timm_student_on_ray(ray_cluster, mlflow_uri, resnet18_file, tmp_path):
    """The practitioner's path: a torchvision teacher whose weights `torch.save(model.state_dict())` wrote, a timm
    student, photos of mixed sizes streamed from disk by each role's DataLoader processes, on Ray; both roles drew
    identical batches (each role's crc32 of every batch it drew is the same)."""
    original, path = resnet18_file
    tree = make_tree(tmp_path / "photos", sizes=(20, 65), per_class=(12, 4), classes=CLASSES)
    cfg = load_config(None, [
        "name=external-kd", f"output_dir={tmp_path}", "method.name=kd",
        f"data={{dataset: imagefolder, root: {tree}, mode: stream, image_size: 32, checksum: true, "
        f"cache_dir: {tmp_path / 'cache'}}}",
        "data.batch_size=8", f"teacher={{model: 'torchvision:resnet18', checkpoint: {path}}}",
        "students=[{model: 'timm:test_resnet'}]", "optim.epochs=1", "optim.steps_per_epoch=3",
        "runtime.executor=ray"])
    summary = train(cfg)
    history = json.loads(max((tmp_path / "external-kd" / "checkpoints").rglob("history.json")).read_text())
    assert history[0]["teacher/data_checksum"] == history[0]["student_0/data_checksum"] != 0
    data = load_dataset(cfg.data)
    with torch.no_grad():  # the teacher's accuracy under Ray is the original model's: its weights arrived intact
        correct = sum(int((original(x).argmax(1) == y).sum()) for x, y in eval_batches(data.test, data))
    assert summary["roles"]["teacher"]["last_test_acc"] == pytest.approx(100.0 * correct / len(data.test.labels))
    best = torch.load(tmp_path / "external-kd" / "best_student.pt", weights_only=True)
    assert best["model"] == "timm:test_resnet" and any(k.startswith("model.layer4") for k in best["state_dict"])
    assert json.loads((tmp_path / "external-kd" / "summary.json").read_text())["epochs"] == 1
