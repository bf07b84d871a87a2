"""Datasets: fixed splits, identical seeded batches on every worker, ImageFolder archives, the real CIFAR-10 copy,
a data source registered by the user."""

import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from conftest import CIFAR_ARCHIVE
from PIL import Image

import ray_kd
from ray_kd.config import ConfigError, DataConfig, load_config
from ray_kd.data import DataError, seeded_batches
from ray_kd.data_sources import SOURCES, DataSource, Split, register_dataset
from ray_kd.datasets import load_dataset


def test_digits_split_is_fixed_and_stratified():
    a, b = load_dataset(DataConfig()), load_dataset(DataConfig())
    assert (len(a.train.labels), len(a.val.labels), len(a.test.labels)) == (1293, 144, 360)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.test.labels, b.test.labels)
    assert torch.bincount(a.test.labels).min() >= 35  # every class present in test, ~36 each


def test_every_worker_draws_the_same_augmented_batches(tmp_path):
    data = load_dataset(DataConfig(dataset="imagefolder", root=str(_tiny_archive(tmp_path)),
                                   cache_dir=str(tmp_path / "cache")))
    assert data.augment == "crop_flip"
    first = list(seeded_batches(data, 8, seed=3, epoch=1))
    again = list(seeded_batches(data, 8, seed=3, epoch=1))
    other = list(seeded_batches(data, 8, seed=3, epoch=2))
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not all(torch.equal(x1, x3) for (x1, _), (x3, _) in zip(first, other))


def test_imagefolder_archive_is_unpacked_decoded_and_cached(tmp_path):
    cfg = DataConfig(dataset="imagefolder", root=str(_tiny_archive(tmp_path)), cache_dir=str(tmp_path / "cache"))
    data = load_dataset(cfg)
    assert data.num_classes == 3 and data.in_channels == 3 and data.train.images.dtype == torch.uint8
    assert len(data.train.labels) + len(data.val.labels) == 30 and len(data.test.labels) == 9
    assert list((tmp_path / "cache").glob("imagefolder-*.pt"))
    assert torch.equal(load_dataset(cfg).test.images, data.test.images)  # from the cache, same tensors


def test_a_broken_archive_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="is not a readable .tar.gz"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(bad), cache_dir=str(tmp_path / "cache")))


@pytest.mark.skipif(not CIFAR_ARCHIVE.is_file(), reason="the shared CIFAR-10 copy is not beside this checkout")
def test_the_real_cifar10_copy(tmp_path):
    data = load_dataset(DataConfig(dataset="imagefolder", root=str(CIFAR_ARCHIVE), cache_dir=str(tmp_path / "cache")))
    assert data.num_classes == 10 and tuple(data.train.images.shape[1:]) == (3, 32, 32)
    assert (len(data.train.labels), len(data.val.labels), len(data.test.labels)) == (45000, 5000, 10000)
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10


def test_a_replaced_archive_is_decoded_again(tmp_path):
    """An archive's decoded cache is keyed by the archive itself (path, size, mtime), not by a walk of its files."""
    cfg = DataConfig(dataset="imagefolder", root=str(_tiny_archive(tmp_path)), cache_dir=str(tmp_path / "cache"))
    before = load_dataset(cfg).test.images
    assert torch.equal(load_dataset(cfg).test.images, before)
    _tiny_archive(tmp_path, seed=1)  # other pixels, same path
    assert not torch.equal(load_dataset(cfg).test.images, before)
    assert len(list((tmp_path / "cache").glob("imagefolder-*.pt"))) == 2


def test_a_split_is_kept_once_computed_and_a_damaged_copy_is_computed_again(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), train_subset=500)
    first = load_dataset(cfg)
    (kept,) = (tmp_path / "cache").glob("split-*.pt")
    again = load_dataset(cfg)  # read back, not split again
    assert torch.equal(first.train.images, again.train.images) and torch.equal(first.val.labels, again.val.labels)
    kept.write_bytes(b"damaged")
    third = load_dataset(cfg)
    assert torch.equal(first.train.images, third.train.images)
    assert torch.load(kept, weights_only=True)["keep"].numel() == len(first.train.labels) == 500  # written again
    load_dataset(DataConfig(cache_dir=str(tmp_path / "cache"), train_subset=400))
    assert len(list((tmp_path / "cache").glob("split-*.pt"))) == 2  # another setting, another split


def _tiny_archive(tmp_path, seed: int = 0):
    """3 classes of 10 train and 3 test 12x12 images, as ImageFolder in a .tar.gz."""
    root = tmp_path / "tiny"
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", 10), ("test", 3)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((12, 12, 3)) * 80 + c * 80).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="tiny")
    return archive


class Stripes(DataSource):
    """Two classes of 6x6 images: horizontal or vertical stripes, with noise."""

    name = "stripes"

    def load(self, cfg):
        def split(n: int, seed: int) -> Split:
            gen = torch.Generator().manual_seed(seed)
            labels = torch.arange(n) % 2
            stripes = (torch.arange(6) % 2 * 200).view(1, 6, 1).expand(n, 6, 6)
            images = torch.where(labels.view(n, 1, 1) == 0, stripes, stripes.transpose(1, 2))
            noise = torch.randint(0, 50, (n, 6, 6), generator=gen)
            return Split((images + noise).to(torch.uint8).unsqueeze(1), labels)

        if cfg.root is not None:
            raise DataError("stripes are drawn, not read: remove data.root")
        return split(80, 0), split(20, 1), 2


@pytest.fixture
def stripes():
    register_dataset(Stripes)
    yield
    SOURCES.pop("stripes")


def test_a_registered_source_trains_a_run(stripes, mlflow_uri, tmp_path):
    data = load_dataset(load_config(None, ["data.dataset=stripes"]).data)
    assert data.num_classes == 2 and data.augment == "crop_flip" and data.train.images.shape[1:] == (1, 6, 6)
    assert len(data.train.labels) + len(data.val.labels) == 80 and len(data.test.labels) == 20
    assert ("stripes", "module test_data", "Two classes of 6x6 images: horizontal or vertical stripes, with noise.") \
        in ray_kd.list_datasets()
    summary = ray_kd.train(None, {
        "name": "stripes", "output_dir": str(tmp_path), "method": {"name": "ce"}, "data.dataset": "stripes",
        "students": [{"model": "digits_cnn_s"}], "runtime.executor": "local", "optim.epochs": 2,
        "data.batch_size": 16})
    assert summary["epochs"] == 2 and summary["headline"]["test_acc_at_best_val"] is not None
    with pytest.raises(DataError, match="stripes are drawn, not read"):
        load_dataset(DataConfig(dataset="stripes", root=str(tmp_path)))
    with pytest.raises(ConfigError, match="data.mode=stream reads ImageFolder trees only; stripes fits in memory"):
        load_config(None, ["data.dataset=stripes", "data.mode=stream"])
    with pytest.raises(ValueError, match="registered twice"):
        register_dataset(type("Stripes", (DataSource,), {"name": "stripes", "__module__": "elsewhere"}))


def test_an_unknown_source_is_one_line_naming_the_known_ones():
    result = subprocess.run([sys.executable, "-m", "ray_kd.cli", "train", "data.dataset=mnist"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("ray-kd: error: config error at data.dataset: unknown data source 'mnist'; choose one of: "
                             "cifar10, cifar100, digits, imagefolder, synthetic (or name a class as "
                             "package.module:Class)\n")


def test_a_source_named_by_its_import_path_loads():
    from ray_kd.data_sources import dataset_identity
    from ray_kd.plugins import PluginError

    cfg = load_config(None, ["data.dataset=test_data:Stripes"])
    data = load_dataset(cfg.data)
    assert data.num_classes == 2 and dataset_identity(cfg.data, data)[0] == "stripes"
    with pytest.raises(PluginError, match="'test_data:_tiny_archive' is not a ray_kd.data_sources.DataSource subclass"):
        load_config(None, ["data.dataset=test_data:_tiny_archive"])
