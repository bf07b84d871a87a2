"""`teacher.cache`: a second KD run with the same teacher, data and seed reads every teacher output, computes the
same numbers, and a changed teacher file or augmentation gets no hit."""

import io
import json
import warnings

import pytest
import torch
from equivalence import assert_same_run, run_local, run_on_ray

from ray_kd.config import ConfigError, load_config
from ray_kd.teacher_cache import CHUNK, FILL_BELOW, SEAL, TeacherCache, describe_size, seal, unseal

STEPS = 5


def kd(tmp_path, teacher, name, *extra):
    return load_config("configs/digits_kd.yaml", [
        "runtime.executor=local", "optim.epochs=2", "optim.milestones=[1]", f"optim.steps_per_epoch={STEPS}",
        "data.batch_size=32", f"teacher.checkpoint={teacher}", f"teacher.cache={tmp_path / 'cache'}",
        f"output_dir={tmp_path}", f"name={name}", *extra])


def run(cfg):
    """The run's history (run_local returns its last checkpoint's folder)."""
    return json.loads((run_local(cfg, show_progress=False) / "history.json").read_text())


def losses(history):
    return [{k: v for k, v in h.items() if "/loss_" in k or k.endswith("_acc")} for h in history]


def test_a_second_run_reads_every_teacher_output_and_computes_the_same(tmp_path, mlflow_uri, digits_teacher, capsys):
    first = run(kd(tmp_path, digits_teacher, "first"))
    assert [h["teacher/cache_misses"] for h in first] == [STEPS, STEPS]
    assert [h["teacher/cache_hits"] for h in first] == [0, 0]
    second = run(kd(tmp_path, digits_teacher, "second"))
    assert [h["teacher/cache_hits"] for h in second] == [STEPS, STEPS]
    assert [h["teacher/cache_misses"] for h in second] == [0, 0]
    assert losses(second) == losses(first)  # identical, teacher scores included (read back too)
    # another seed is another set of batches: no hit
    other = run(kd(tmp_path, digits_teacher, "seed1", "seed=1"))
    assert [h["teacher/cache_hits"] for h in other] == [0, 0]


def test_a_cache_on_an_object_store_serves_a_second_run(tmp_path, mlflow_uri, digits_teacher, s3_bucket):
    """teacher.cache=s3://...: what a sweep's trials on nodes without a shared folder read."""
    cache = s3_bucket.uri("teacher-cache")
    first = run(kd(tmp_path, digits_teacher, "first", f"teacher.cache={cache}"))
    second = run(kd(tmp_path, digits_teacher, "second", f"teacher.cache={cache}"))
    assert [h["teacher/cache_misses"] for h in first] == [STEPS, STEPS]
    assert [h["teacher/cache_hits"] for h in second] == [STEPS, STEPS]
    assert losses(second) == losses(first)
    from pyarrow import fs

    store, base = fs.FileSystem.from_uri(cache)
    names = {i.base_name for i in store.get_file_info(fs.FileSelector(base, recursive=True))}
    assert {"key.json", "scores.json", "r0of1-c00000.pt", "e0000", "e0001"} <= names


def test_a_float32_cache_computes_what_a_run_without_it_does(tmp_path, mlflow_uri, digits_teacher):
    plain = run(kd(tmp_path, digits_teacher, "plain", "teacher.cache=null"))
    writes = run(kd(tmp_path, digits_teacher, "writes", "teacher.cache_dtype=float32"))
    reads = run(kd(tmp_path, digits_teacher, "reads", "teacher.cache_dtype=float32"))
    assert [h["teacher/cache_hits"] for h in reads] == [STEPS, STEPS]
    assert losses(plain) == losses(writes) == losses(reads)


def test_cache_teacher_fills_every_step_before_the_runs(tmp_path, mlflow_uri, digits_teacher, capsys):
    from ray_kd import api

    cfg = kd(tmp_path, digits_teacher, "filled")
    assert api.cache_teacher(cfg) == {"read": 0, "computed": 2 * STEPS}
    assert api.cache_teacher(cfg) == {"read": 2 * STEPS, "computed": 0}
    assert f"teacher.cache epoch 2/2: 0 steps computed, {STEPS} read" in capsys.readouterr().out
    history = run(cfg)
    assert [h["teacher/cache_hits"] for h in history] == [STEPS, STEPS]
    assert [h["teacher/cache_misses"] for h in history] == [0, 0]
    with pytest.raises(ConfigError, match="cache-teacher fills teacher.cache"):
        api.cache_teacher(kd(tmp_path, digits_teacher, "none", "teacher.cache=null"))


def test_a_changed_teacher_file_or_augmentation_gets_no_hit(tmp_path, mlflow_uri, digits_teacher):
    run(kd(tmp_path, digits_teacher, "first"))
    changed = torch.load(digits_teacher, weights_only=True)
    state = changed["state_dict"]
    first_weight = next(k for k, v in state.items() if v.dtype.is_floating_point)
    state[first_weight] = state[first_weight] + 0.01
    other_teacher = tmp_path / "other_teacher.pt"
    torch.save(changed, other_teacher)
    for name, cfg in [("teacher", kd(tmp_path, other_teacher, "other-teacher")),
                      ("augmentation", kd(tmp_path, digits_teacher, "other-aug", "data.augment=none"))]:
        history = run(cfg)
        assert [h["teacher/cache_hits"] for h in history] == [0, 0], name


def corrupt_run(tmp_path, teacher, name, capsys):
    """A run whose epoch lines are kept: (history, its console output)."""
    capsys.readouterr()
    history = json.loads((run_local(kd(tmp_path, teacher, name)) / "history.json").read_text())
    return history, capsys.readouterr().out


@pytest.mark.parametrize("damage", ["not a torch file", "a flipped byte that still loads"])
def test_a_corrupt_entry_is_recomputed_and_counted_on_the_epoch_line(tmp_path, mlflow_uri, digits_teacher, capsys,
                                                                      damage):
    first = run(kd(tmp_path, digits_teacher, "first"))
    (chunk,) = sorted((tmp_path / "cache").glob("*/e0000/*.pt"))
    data = bytearray(chunk.read_bytes())
    if damage == "not a torch file":
        data = b"not a torch file"
    else:  # inside the first step's logits: the file still loads, with another value there
        entries = torch.load(io.BytesIO(unseal(bytes(data))), weights_only=True)
        at = bytes(data).find(entries[0]["logits"].numpy().tobytes()[:32])
        assert at > 0
        data[at + 1] ^= 0x40
        torch.load(io.BytesIO(bytes(data[len(SEAL) + 32:])), weights_only=True)  # it does load
    chunk.write_bytes(bytes(data))
    second, out = corrupt_run(tmp_path, digits_teacher, "second", capsys)
    assert [h["teacher/cache_hits"] for h in second] == [0, STEPS]
    assert [h["teacher/cache_corrupt"] for h in second] == [1, 0]
    lines = [line for line in out.splitlines() if "val/test top-1" in line]  # the epoch lines
    assert "1 corrupt chunk of teacher.cache computed again" in lines[0] and "corrupt" not in lines[1]
    assert losses(second) == losses(first)
    assert torch.load(io.BytesIO(unseal(chunk.read_bytes())), weights_only=True).keys() == set(range(STEPS))


def test_an_inf_or_nan_read_from_the_cache_is_corrupt(tmp_path):
    cache = TeacherCache(tmp_path, {"k": 1}, steps_per_epoch=CHUNK, topk=2)
    for step in range(CHUNK):
        cache.put(0, step, {"logits": torch.arange(6.0).view(2, 3)})
    name = cache._name(0, 0)
    assert TeacherCache(tmp_path, {"k": 1}, steps_per_epoch=CHUNK, topk=2).get(0, 5, torch.device("cpu")) is not None
    entries = torch.load(io.BytesIO(unseal(cache.store.read_bytes(name))), weights_only=True)
    entries[5]["logits"]["values"][0, 0] = float("nan")  # sealed as it is: the digest matches
    buffer = io.BytesIO()
    torch.save(entries, buffer)
    cache.store.write_bytes(name, seal(buffer.getvalue()))
    reader = TeacherCache(tmp_path, {"k": 1}, steps_per_epoch=CHUNK, topk=2)
    assert reader.get(0, 0, torch.device("cpu")) is None and reader.corrupt == 1
    assert cache.store.read_bytes(name) is None  # deleted, to be written again
    for step in range(CHUNK):  # a teacher computing an inf is not stored
        reader.put(0, step, {"logits": torch.full((2, 3), float("inf"))})
    assert cache.store.read_bytes(name) is None


def test_a_cache_that_cannot_be_written_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
    cache = TeacherCache(tmp_path, {"k": 1}, steps_per_epoch=CHUNK * 2)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(CHUNK * 2):
            stored = cache.put(0, step, {"logits": torch.ones(2, 3)})
    assert torch.equal(stored["logits"], torch.ones(2, 3))
    assert [str(w.message) for w in caught] == [
        f"teacher.cache: cannot write {cache.store.root / 'e0000' / 'r0of1-c00000.pt'} (No space left on device); "
        "this run stores nothing more there and goes on"]
    assert not list(cache.store.root.rglob("*.pt")) and not list(cache.store.root.rglob(".*"))  # no temporary file


def test_top_k_keeps_the_renormalised_distribution():
    cache = TeacherCache.__new__(TeacherCache)
    cache.topk, cache.dtype = 3, torch.float16
    logits = torch.tensor([[4.0, 1.0, 3.0, -2.0, 0.5], [0.0, 0.1, 0.2, 0.3, 0.4]])
    decoded = TeacherCache._decode(cache._encode({"logits": logits}), torch.device("cpu"))["logits"]
    for temperature in (1.0, 4.0, 100.0):
        p = torch.softmax(decoded / temperature, 1)
        top = logits.topk(3, dim=1)
        want = torch.zeros_like(p).scatter_(1, top.indices, torch.softmax(top.values.half().float() / temperature, 1))
        assert torch.allclose(p, want, atol=1e-6)
    assert decoded.min() > -2 * FILL_BELOW  # finite


def test_partial_chunks_are_not_written(tmp_path):
    cache = TeacherCache(tmp_path, {"k": 1}, steps_per_epoch=CHUNK + 3)
    logits = {"logits": torch.randn(4, 10)}
    for step in range(CHUNK + 1):  # the first chunk whole, one step of the second
        assert cache.get(0, step, torch.device("cpu")) is None
        cache.put(0, step, logits)
    cache.flush()  # a run stopped here: the second chunk is computed again next time
    assert [p.name for p in sorted(cache.store.root.glob("e0000/*.pt"))] == ["r0of1-c00000.pt"]


def test_bad_settings_are_one_line(tmp_path, digits_teacher):
    with pytest.raises(ConfigError, match="teacher.cache_topk keeps the top-k logits in teacher.cache: set teacher.cache too"):
        load_config("configs/digits_kd.yaml", [f"teacher.checkpoint={digits_teacher}", "teacher.cache_topk=3"])
    with pytest.raises(ConfigError, match="teacher.cache_topk is for method kd"):
        load_config("configs/digits_kd.yaml", [f"teacher.checkpoint={digits_teacher}", "method.name=kd+skd",
                                               f"teacher.cache={tmp_path}", "teacher.cache_topk=3"])
    with pytest.raises(ConfigError, match="ftp:// is not supported .*teacher.cache is a local path, a file:// URI or "
                                          "an object store"):
        load_config("configs/digits_kd.yaml", [f"teacher.checkpoint={digits_teacher}", "teacher.cache=ftp://b/x"])
    cfg = load_config("configs/sokd_digits.yaml", [f"teacher.checkpoint={digits_teacher}", "runtime.executor=local",
                                                   f"teacher.cache={tmp_path}", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="teacher.cache keeps a frozen teacher's outputs, but sokd's teacher trains"):
        run_local(cfg, show_progress=False)


def test_the_epoch_line_says_how_the_teacher_served():
    from ray_kd.session import teacher_note

    record = {"teacher/steps_ahead": 2.0, "teacher/cache_hits": 70.0, "teacher/cache_misses": 9.0,
              "student_0/wait_ms": 0.25, "teacher/wait_ms": 110.0}
    assert teacher_note(record) == ", teacher 2 steps ahead, cache 70/79 steps read, students waited 0.2 ms/step"
    assert teacher_note({"student_0/wait_ms": 3.0, "student_1/wait_ms": 1.0}) == ""  # DML: no teacher to speak of


def test_the_size_line_for_imagenet():
    assert describe_size(1_281_167, 1000, None, 100) == (
        "2.6 GB per epoch of fp16 logits for 1,281,167 images x 1,000 classes, 256.2 GB for 100 epochs")
    assert describe_size(1_281_167, 1000, 20, 100) == (
        "102.5 MB per epoch of top-20 logits (fp16 values, int indices) for 1,281,167 images x 1,000 classes, "
        "10.2 GB for 100 epochs")


def test_the_ray_executor_reads_the_cache_the_local_one_wrote(ray_cluster, tmp_path, mlflow_uri, digits_teacher,
                                                             capsys):
    from ray_kd import api

    local = run_local(kd(tmp_path, digits_teacher, "local"), show_progress=False)
    remote = run_on_ray(kd(tmp_path, digits_teacher, "ray", "runtime.executor=ray", "runtime.cpus_per_worker=0.5"))
    assert [h["teacher/cache_hits"] for h in json.loads((remote / "history.json").read_text())] == [STEPS, STEPS]
    assert_same_run(local, remote, ["student_0"])
    # two replicas: each replica's teacher reads the shard `cache-teacher` stored for it
    replicas = kd(tmp_path, digits_teacher, "replicas", "runtime.executor=ray", "runtime.replicas=2",
                  "runtime.placement=together", "runtime.cpus_per_worker=0.5")
    assert api.cache_teacher(replicas) == {"read": 0, "computed": 2 * 2 * STEPS}
    (chunk,) = (tmp_path / "cache").glob("*/e0000/r0of2-*.pt")  # a byte flipped in replica 0's first chunk
    data = bytearray(chunk.read_bytes())
    data[-100] ^= 1
    chunk.write_bytes(bytes(data))
    capsys.readouterr()
    history = json.loads((run_on_ray(replicas) / "history.json").read_text())
    assert [(h["teacher/cache_hits"], h["teacher/cache_misses"]) for h in history] == [(0, STEPS), (STEPS, 0)]
    assert "1 corrupt chunk of teacher.cache computed again" in capsys.readouterr().out  # on the driver's console


def digits_folder(root):
    """The digits as an ImageFolder of 8x8 grey PNGs named alike in every class (0000.png...)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    counts = {}
    for image, label in zip((bunch.images * (255 / 16)).round().astype(np.uint8), bunch.target):
        i = counts[label] = counts.get(label, -1) + 1
        if i >= 16:
            continue
        folder = root / ("test" if i < 4 else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_images_changed_under_the_same_names_are_never_read_stale(tmp_path, mlflow_uri, mode):
    """Images overwritten in place, then two class folders swapped: the cache reads none of the old outputs, and
    the run equals one with a fresh cache on the same data."""
    from ray_kd.checkpoint import save_model_file
    from ray_kd.models import create_model

    root = digits_folder(tmp_path / "digits")
    torch.manual_seed(0)  # an untrained RGB teacher (an ImageFolder is read as RGB): a fixed function of the images
    teacher = tmp_path / "rgb_teacher.pt"
    save_model_file(teacher, "digits_cnn_l", 10, 3, create_model("digits_cnn_l", 10, 3).state_dict())
    stream = ["data.image_size=8", "data.workers=0", "data.augment=none"] if mode == "stream" else []

    def folder_kd(name, cache):
        return kd(tmp_path, teacher, name, "data.dataset=imagefolder", f"data.root={root}",
                  f"data.mode={mode}", *stream, f"data.cache_dir={tmp_path / 'data-cache'}",
                  f"teacher.cache={tmp_path / cache}", "optim.steps_per_epoch=2", "data.batch_size=16")

    assert [h["teacher/cache_misses"] for h in run(folder_kd("first", "cache"))] == [2, 2]
    for path in sorted((root / "train" / "3").glob("*.png")):  # the 3s overwritten by 8s, under their names
        path.write_bytes((root / "train" / "8" / path.name).read_bytes())
    changed, fresh = run(folder_kd("changed", "cache")), run(folder_kd("fresh", "fresh"))
    assert [h["teacher/cache_hits"] for h in changed] == [0, 0]
    assert losses(changed) == losses(fresh)
    (root / "train" / "1").rename(root / "train" / "swap")  # 1 <-> 7: every name is in both
    (root / "train" / "7").rename(root / "train" / "1")
    (root / "train" / "swap").rename(root / "train" / "7")
    swapped, fresh = run(folder_kd("swapped", "cache")), run(folder_kd("fresh-swapped", "fresh-swapped"))
    assert [h["teacher/cache_hits"] for h in swapped] == [0, 0]
    assert losses(swapped) == losses(fresh)
    again = run(folder_kd("again", "cache"))  # the same data a second time: read
    assert [h["teacher/cache_hits"] for h in again] == [2, 2] and losses(again) == losses(swapped)
