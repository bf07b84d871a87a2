"""`pretrained: true`: weights from the libraries' own caches, without a network.

A timm model through a Hugging Face cache laid out here (`models--timm--<name>/snapshots/<rev>/model.safetensors`
and `refs/main`, HF_HUB_OFFLINE=1), a torchvision one through torch.hub's cache (`$TORCH_HOME/hub/checkpoints/
<file>`: torch.hub checks a file's hash only when it downloads it), each loaded weight compared with the file laid
out; the one line when a cache is empty and nothing can be downloaded; the data's normalisation following the
weights'."""

from pathlib import Path

import pytest
import torch
from test_streaming import make_tree

from ray_kd.checkpoint import CheckpointError
from ray_kd.cli import main
from ray_kd.config import load_config
from ray_kd.hub_weights import HubWeightsError, hf_cache, hub_weights
from ray_kd.methods import Role
from ray_kd.run import train
from ray_kd.weights import load_backbone

TIMM, TORCHVISION = "timm:test_resnet", "torchvision:mobilenet_v3_small"
CLASSES = 3
NO_NETWORK = "http://127.0.0.1:9"
"""A proxy no one listens on: every download fails at once, whether or not this machine has internet."""


@pytest.fixture()
def caches(tmp_path, monkeypatch):
    """Empty library caches of this test only; downloads fail."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, NO_NETWORK)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    return tmp_path


def lay_out_timm(name: str = "test_resnet", seed: int = 7, architecture: str | None = None) -> dict[str, torch.Tensor]:
    """timm's repo of `name`'s pretrained weights in the Hugging Face cache as huggingface_hub writes it, holding
    weights of the right shapes (another init than any ray-kd would draw), or of another `architecture`'s."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in timm.create_model(architecture or name).state_dict().items()}
    repo = hf_cache() / f"models--{hub_weights(f'timm:{name}').hf_repo.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    save_file(state, snapshot / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return state


def lay_out_torchvision(name: str = "mobilenet_v3_small", seed: int = 7) -> dict[str, torch.Tensor]:
    """torchvision's file of `name`'s DEFAULT weights in torch.hub's cache, under the name torchvision asks for
    (whose hash prefix is not this file's: torch.hub checks it only when it downloads)."""
    import torchvision

    torch.manual_seed(seed)
    state = torchvision.models.get_model(name).state_dict()
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / Path(hub_weights(f"torchvision:{name}").url).name)
    return state


def assert_loaded(net: torch.nn.Module, state: dict[str, torch.Tensor], head: tuple[str, ...]) -> None:
    """Every tensor of the file in the net (under the adapter's `model.`) but the head, which is a fresh one."""
    loaded = net.state_dict()
    for key, value in state.items():
        if key.startswith(head):
            assert loaded[f"model.{key}"].shape[0] == CLASSES
        else:
            assert torch.equal(loaded[f"model.{key}"], value), key


def test_a_timm_model_loads_from_the_hugging_face_cache_and_trains(caches, tmp_path, mlflow_uri):
    state = lay_out_timm()
    torch.manual_seed(0)
    assert_loaded(load_backbone(Role("student_0", TIMM, pretrained=True, replace_head=True), CLASSES, 3), state,
                  head=("fc.",))
    with pytest.raises(CheckpointError) as err:  # another class count needs replace_head
        load_backbone(Role("student_0", TIMM, pretrained=True), CLASSES, 3)
    assert "timm's pretrained test_resnet.r160_in1k has a 1000-class head (model.fc.weight, model.fc.bias) but " \
           "this run has 3 classes; set students.0.replace_head=true" in str(err.value)

    tree = make_tree(tmp_path / "photos", sizes=16, per_class=(8, 2), classes=CLASSES)
    cfg = load_config(None, [
        "name=pretrained-timm", f"output_dir={tmp_path / 'runs'}", "method={name: ce}", "runtime.executor=local",
        f"data={{dataset: imagefolder, root: {tree}, batch_size: 8, cache_dir: {tmp_path / 'cache'}}}",
        f"students=[{{model: '{TIMM}', pretrained: true, replace_head: true}}]", "optim.epochs=1",
        "optim.steps_per_epoch=2", "tracking.system_metrics_interval=0"])
    assert cfg.data.normalize == ([0.5] * 3, [0.5] * 3)  # test_resnet's pretrained_cfg mean/std
    summary = train(cfg)
    assert summary["epochs"] == 1 and summary["roles"]["student_0"]["last_test_acc"] is not None
    best = torch.load(summary["best_student_file"], weights_only=True)
    assert best["preprocessing"]["mean"] == pytest.approx([0.5] * 3)  # the shipped model normalises as trained


def test_a_cached_file_of_other_shapes_is_one_line(caches):
    lay_out_timm(architecture="resnet10t")
    with pytest.raises(HubWeightsError) as err:
        load_backbone(Role("student_0", TIMM, pretrained=True, replace_head=True), CLASSES, 3)
    assert str(err.value).startswith("students.0.pretrained: timm's pretrained test_resnet.r160_in1k in the cache "
                                     "does not fit timm:test_resnet (RuntimeError: Error(s) in loading state_dict")
    assert "\n" not in str(err.value) and str(err.value).endswith("delete it from the cache to fetch it again")


def test_a_torchvision_model_loads_from_torch_hubs_cache(caches):
    state = lay_out_torchvision()
    torch.manual_seed(0)
    net = load_backbone(Role("teacher", TORCHVISION, pretrained=True, replace_head=True), CLASSES, 3)
    assert_loaded(net, state, head=("classifier.3.",))
    assert hub_weights(TORCHVISION).mean == pytest.approx((0.485, 0.456, 0.406))


@pytest.mark.parametrize("model, expected", [
    (TIMM, "students.0.pretrained: timm's pretrained test_resnet.r160_in1k is not in the Hugging Face cache "
           "(looked for repo timm/test_resnet.r160_in1k, model.safetensors or pytorch_model.bin, in {hf}/hub/"
           "models--timm--test_resnet.r160_in1k; HF_HUB_OFFLINE is set); on a machine with internet run python -c "
           "\"import timm; timm.create_model('test_resnet.r160_in1k', pretrained=True)\" and copy its "
           "$HF_HOME/hub/models--timm--test_resnet.r160_in1k"),
    (TORCHVISION, "students.0.pretrained: torchvision's pretrained mobilenet_v3_small.IMAGENET1K_V1 is not in "
                  "torch.hub's cache (looked for {torch}/hub/checkpoints/mobilenet_v3_small-047dcff4.pth) and could "
                  "not be downloaded (URLError: "),
])
def test_an_empty_cache_offline_is_one_line_naming_what_to_fetch(caches, capsys, model, expected):
    argv = ["train", "name=offline", f"output_dir={caches / 'runs'}", "method={name: ce}", "runtime.executor=local",
            f"students=[{{model: '{model}', pretrained: true, replace_head: true}}]", "data.dataset=imagefolder",
            f"data.root={make_tree(caches / 'photos', sizes=16, per_class=(8, 1), classes=CLASSES)}",
            f"data.cache_dir={caches / 'cache'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected.format(hf=caches / "hf", torch=caches / "torch") in err, err
    if model == TORCHVISION:
        assert "torchvision.models.get_model_weights('mobilenet_v3_small').DEFAULT.get_state_dict()" in err
        assert "TORCH_HOME" in err


def test_the_data_normalises_as_the_pretrained_weights_unless_set():
    photos = ["method={name: ce}", "data.dataset=imagefolder", "data.root=/photos"]
    imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torchvision_first = [f"teacher={{model: '{TORCHVISION}', pretrained: true}}", "method.name=kd",
                         f"students=[{{model: '{TIMM}', pretrained: true}}]"]
    assert load_config(None, photos[1:] + torchvision_first).data.normalize == imagenet  # the teacher's first
    timm_only = photos + [f"students=[{{model: '{TIMM}', pretrained: true}}]"]
    assert load_config(None, timm_only).data.normalize == ([0.5] * 3, [0.5] * 3)
    assert load_config(None, timm_only + ["data.normalize=dataset"]).data.normalize == "dataset"
    again = load_config(load_config(None, timm_only), ["seed=1"])  # a saved config keeps what it resolved to
    assert again.data.normalize == ([0.5] * 3, [0.5] * 3)
    assert load_config(None, photos + [f"students=[{{model: '{TIMM}'}}]"]).data.normalize == "dataset"
