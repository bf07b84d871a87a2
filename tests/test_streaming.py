"""Streaming ImageFolder (data.mode=stream): images of any size read from disk by DataLoader processes,
yet every role draws the same pixels at every step, in the in-memory path's order."""

import json

import numpy as np
import pytest
import torch
from equivalence import assert_same_run, run_both
from PIL import Image

from ray_kd.config import ConfigError, DataConfig, load_config
from ray_kd.data import DataError, epoch_order, eval_batches, seeded_batches
from ray_kd.datasets import load_dataset
from ray_kd.streaming import StreamDataset


def make_tree(root, sizes=(20, 65), per_class=(12, 3), classes=3, seed=0):
    """An ImageFolder of noisy class-tinted JPEGs, each of its own random size when `sizes` is a range."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(*sizes, size=2) if isinstance(sizes, tuple) else (sizes, sizes)
                pixels = (rng.random((h, w, 3)) * 80 + c * 80).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png" if sizes == 12 else folder / f"{i:03d}.jpg")
    return root


def stream_cfg(tmp_path, root, **extra) -> DataConfig:
    return DataConfig(dataset="imagefolder", root=str(root), mode="stream", image_size=32, batch_size=8,
                      cache_dir=str(tmp_path / "cache"), **extra)


def test_stream_reads_the_same_split_in_the_same_order_as_memory(tmp_path):
    root = make_tree(tmp_path / "tree", sizes=12, per_class=(20, 3))
    for subset in (None, 30):
        common = dict(dataset="imagefolder", root=str(root), batch_size=8, cache_dir=str(tmp_path / "cache"),
                      train_subset=subset)
        memory = load_dataset(DataConfig(**common))
        stream = load_dataset(DataConfig(**common, mode="stream", image_size=12, workers=0))
        assert isinstance(stream, StreamDataset) and stream.num_classes == memory.num_classes == 3
        for part in ("train", "val", "test"):
            assert torch.equal(getattr(stream, part).labels, getattr(memory, part).labels), part
        for epoch in (0, 1):
            mem_labels = [y for _, y in seeded_batches(memory, 8, seed=5, epoch=epoch)]
            stream_labels = [y for _, y in seeded_batches(stream, 8, seed=5, epoch=epoch)]
            assert len(mem_labels) == len(stream_labels) > 1
            for a, b in zip(mem_labels, stream_labels):
                assert torch.equal(a, b)
    _, order = epoch_order(len(stream.train.labels), seed=5, epoch=1)
    keys = [key for batch in _planned(stream, seed=5, epoch=1) for key in batch]
    assert [index for _, index, *_ in keys] == order.tolist()


def _planned(stream, seed, epoch):
    """The batches of keys the sampler hands the DataLoader for one epoch."""
    batches = stream.train_batches(8, seed, epoch)
    next(batches)  # sets the plan
    return list(stream._plans["train"])


def test_a_scoring_pass_between_training_steps_leaves_the_training_pass_whole(tmp_path):
    """On Ray a frozen teacher scores ahead between its training steps: both passes run at once, each on its own
    loader (one shared persistent loader handed the suspended training pass scoring batches: issue 35)."""
    root = make_tree(tmp_path / "tree")
    stream = load_dataset(stream_cfg(tmp_path, root, workers=1))
    alone = [y for _, y in seeded_batches(stream, 8, 3, 0)]
    interleaved, scored = [], []
    scoring = eval_batches(stream.val, stream)
    for _, y in seeded_batches(stream, 8, 3, 0):
        interleaved.append(y)
        scored += [y for _, y in [next(scoring, (None, None))] if y is not None]
    assert [len(y) for y in interleaved] == [len(y) for y in alone]
    assert all(torch.equal(a, b) for a, b in zip(interleaved, alone))
    assert torch.equal(torch.cat(scored), stream.val.labels[:sum(len(y) for y in scored)])


def test_stream_batches_are_deterministic_whoever_decodes_them(tmp_path):
    root = make_tree(tmp_path / "tree")
    two = load_dataset(stream_cfg(tmp_path, root, workers=2))
    none = load_dataset(stream_cfg(tmp_path, root, workers=0))  # decoded in this process, other RNG history
    torch.manual_seed(123)
    first, again = list(seeded_batches(two, 8, 3, 0)), list(seeded_batches(none, 8, 3, 0))
    assert len(first) == 4 and first[0][0].shape == (8, 3, 32, 32)
    for (x1, y1), (x2, y2) in zip(first, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # one sample: the same crop and flip each time it is drawn in an epoch, different ones across epochs
    a, b, c = (two[("train", 0, 3, epoch, True)][0] for epoch in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # evaluation crops are fixed: the same on both, and the mean/std were measured (and cached) once
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(two.eval_batches(two.test), none.eval_batches(none.test)))
    assert torch.equal(two.mean, none.mean) and len(list((tmp_path / "cache").glob("stream-stats-*.json"))) == 1


def test_normalize_imagenet_and_explicit(tmp_path):
    root = make_tree(tmp_path / "tree", per_class=(10, 1))
    data = load_dataset(stream_cfg(tmp_path, root, workers=0, normalize="imagenet"))
    assert torch.allclose(data.mean, torch.tensor([0.485, 0.456, 0.406]))
    data = load_dataset(stream_cfg(tmp_path, root, workers=0, normalize=([0.5] * 3, [0.25] * 3)))
    x, _ = next(seeded_batches(data, 4, 0, 0))
    raw = data[("train", int(epoch_order(len(data.train.labels), 0, 0)[1][0]), 0, 0, True)][0]
    assert torch.allclose(x[0], (raw.float() / 255 - 0.5) / 0.25)
    with pytest.raises(DataError, match="data.normalize gives 3 channels but the images have 1"):
        load_dataset(DataConfig(normalize="imagenet"))  # the digits are grey


def test_an_unreadable_image_is_one_line(tmp_path):
    root = make_tree(tmp_path / "tree", per_class=(10, 1))
    (root / "train" / "class1" / "000.jpg").write_bytes(b"not a jpeg at all")
    data = load_dataset(stream_cfg(tmp_path, root, normalize="imagenet"))
    with pytest.raises(DataError, match=r"class1/000.jpg: unreadable image \(.*\); remove or replace the file") as err:
        list(seeded_batches(data, 4, 0, 0))
    assert "\n" not in str(err.value)


def test_a_stream_dataset_stops_its_loader_processes_when_dropped_or_failed(tmp_path):
    """A persistent loader's processes end with its dataset, not when the garbage collector gets to it (stopping
    them from there waits out 5 s per process), and at once when an unreadable image fails a pass."""
    import gc
    import multiprocessing

    from torchvision.transforms import v2  # noqa: F401  a dataset that is first to import it stays referenced

    root = make_tree(tmp_path / "tree", per_class=(10, 1))
    before = set(multiprocessing.active_children())
    gc.disable()
    try:
        data = load_dataset(stream_cfg(tmp_path, root, normalize="imagenet", workers=2))
        list(seeded_batches(data, 4, 0, 0))
        assert len(set(multiprocessing.active_children()) - before) == 2  # kept for the next epoch
        del data
        assert set(multiprocessing.active_children()) == before
        bad = root / "train" / "class1" / "000.jpg"
        bad.write_bytes(b"not a jpeg at all")
        data = load_dataset(stream_cfg(tmp_path, root, normalize="imagenet", workers=2))
        with pytest.raises(DataError, match="unreadable image"):
            list(seeded_batches(data, 4, 0, 0))
        assert set(multiprocessing.active_children()) == before
        bad.write_bytes((bad.parent / "001.jpg").read_bytes())  # replaced: the next pass starts a loader of its own
        assert len(list(seeded_batches(data, 4, 0, 1))) == 7
    finally:
        gc.enable()


def test_stream_is_refused_where_it_does_not_apply():
    with pytest.raises(ConfigError, match="data.mode=stream reads ImageFolder trees only; digits fits in memory"):
        load_config(None, ["data.mode=stream"])
    with pytest.raises(ConfigError, match="data.image_size applies to data.mode=stream only"):
        load_config(None, ["data.image_size=64"])


def test_both_roles_draw_identical_batches_on_ray(ray_cluster, tmp_path):
    """DML between two resnet8 peers on mixed-size images: each role's crc32 of every batch it drew is the same,
    on Ray (a worker and its DataLoader processes per role) and in one process, and the runs agree."""
    root = make_tree(tmp_path / "tree")
    overrides = ["data.dataset=imagefolder", f"data.root={root}", "data.mode=stream", "data.image_size=32",
                 "data.batch_size=8", "data.checksum=true", f"data.cache_dir={tmp_path / 'cache'}",
                 "students=[{model: resnet8}, {model: resnet8}]"]
    local, remote = run_both(tmp_path, overrides, epochs=2, steps=3)
    assert_same_run(local, remote, ["student_0", "student_1"])
    for folder in (local, remote):
        history = json.loads((folder / "history.json").read_text())
        sums = [(h["student_0/data_checksum"], h["student_1/data_checksum"]) for h in history]
        assert all(a == b for a, b in sums) and sums[0][0] != sums[1][0]  # same per epoch, new each epoch
    local_sums = [h["student_0/data_checksum"] for h in json.loads((local / "history.json").read_text())]
    remote_sums = [h["student_0/data_checksum"] for h in json.loads((remote / "history.json").read_text())]
    assert local_sums == remote_sums


def test_a_replica_reads_only_its_shard_with_the_same_pixels(tmp_path):
    """`runtime.replicas`: in stream mode replica r decodes only its `tensor_split` shard of each batch, the
    pixels the whole batch would hold there (each sample's augmentation is seeded by its index)."""
    root = make_tree(tmp_path / "tree")
    stream = load_dataset(stream_cfg(tmp_path, root, workers=0))
    whole = list(seeded_batches(stream, 8, 3, 0))
    for r in range(3):
        shards = list(seeded_batches(stream, 8, 3, 0, part=(r, 3)))
        assert len(shards) == len(whole)
        for (x, y), (xs, ys) in zip(whole, shards):
            assert torch.equal(torch.tensor_split(y, 3)[r], ys) and torch.equal(torch.tensor_split(x, 3)[r], xs)
