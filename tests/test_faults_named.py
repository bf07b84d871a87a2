"""Faults and inputs named in one line: the real cause, the run's true MLflow state, and advice that holds.

A read-only folder, a full disk and a machine without network are made for real, in a namespace of the command's
own (`unshare`: a tmpfs mounted read-only or small, a network namespace with no interface up), so they need no
root and leave nothing mounted behind."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ray_kd import api
from ray_kd.cli import main
from ray_kd.data import DataError, eval_batches, seeded_batches
from ray_kd.datasets import load_dataset
from ray_kd.errors import UserError
from test_streaming import make_tree, stream_cfg

REPO = Path(__file__).resolve().parents[1]
QUICK = ["runtime.executor=local", "optim.epochs=1", "optim.steps_per_epoch=2", "optim.milestones=[]"]
NAMESPACED = pytest.mark.skipif(
    shutil.which("unshare") is None or subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "--net", "true"], capture_output=True).returncode != 0,
    reason="this machine refuses unprivileged user namespaces (unshare --user), which make the read-only folder, "
           "the full disk and the missing network of these tests")


def ray_kd_isolated(tmp_path, args, mounts=(), network=True, env=None, timeout=300):
    """`ray-kd ARGS` in its own user and mount namespace (and network namespace, with no interface up, when not
    `network`), after mounting a tmpfs with the given options on each of `mounts` ({folder: options}) there."""
    mounts = dict(mounts)
    for folder in mounts:
        Path(folder).mkdir(parents=True, exist_ok=True)
    script = "".join(f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(folder))} && "
                     for folder, options in mounts.items())
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           **(env or {})}
    command = ["unshare", "--user", "--map-root-user", "--mount", *([] if network else ["--net"]),
               "sh", "-c", script + 'exec "$@"', "sh", sys.executable, "-m", "ray_kd.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def one_error_line(stderr: str) -> str:
    """The only line of `stderr` that is not a log line of MLflow's store setup."""
    lines = [line for line in stderr.strip().splitlines() if " INFO mlflow." not in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# --- bad input: one line ------------------------------------------------------------------------------------------

def test_overrides_before_and_after_the_space_are_all_taken(tmp_path, capsys):
    """`ray-kd tune a=1 --space s.yaml b=2`: argparse alone takes the overrides as one list and refuses the rest as
    "unrecognized arguments"; the bad one after --space must reach the config and be named there."""
    code = main(["tune", f"output_dir={tmp_path}", "--space", str(REPO / "tuning/spaces/kd.yaml"),
                 "optim.epochs=zero"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.epochs" in err and "integer" in err, err
    with pytest.raises(SystemExit):
        main(["tune", "--space", str(REPO / "tuning/spaces/kd.yaml"), "optim.epochs=1", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_train_teacher_help_says_what_it_trains(capsys):
    """It runs the config's own method (a DML config trains two peers) and keeps the best student: the help must
    not promise students.0 alone with cross-entropy."""
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "students.0) with cross-entropy" not in out
    assert "run the config (its method" in out and "save its best student as a teacher file" in out


@pytest.mark.parametrize("out", [None, "", 3])
def test_train_teacher_without_a_file_is_one_clear_error(out):
    with pytest.raises(UserError, match="train_teacher needs out, the teacher file to write"):
        api.train_teacher("configs/digits_teacher.yaml", out)


@pytest.mark.parametrize("override, named", [
    ("optim.milestones=[1,", "expected the node content, but found '<stream end>' at column 4"),
    ("name={a: b", "expected ',' or '}', but got '<stream end>' at column 6"),
])
def test_an_override_that_is_not_yaml_is_one_line(override, named, tmp_path, capsys):
    assert main(["train", f"output_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "not valid YAML" in err, err


@pytest.mark.parametrize("content", [b"", b"garbage, not an archive"])
def test_an_archive_that_is_no_tar_is_one_line(content, tmp_path, capsys):
    (tmp_path / "set.tar.gz").write_bytes(content)
    assert main(["train", f"output_dir={tmp_path / 'runs'}", "data.dataset=imagefolder",
                 f"data.root={tmp_path / 'set.tar.gz'}", f"data.cache_dir={tmp_path / 'cache'}", *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "set.tar.gz is not a readable .tar.gz (ReadError: " in err, err


@NAMESPACED
def test_report_into_a_read_only_folder_is_one_line(tmp_path):
    """Checked before the store is read: no report is computed that cannot be written."""
    folder = tmp_path / "read-only"
    proc = ray_kd_isolated(tmp_path, ["report", "--out", str(folder / "report")], mounts={folder: "ro"})
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert f"--out={folder / 'report'} is not a writable folder (Read-only file system)" in line, line


@NAMESPACED
def test_a_read_only_storage_cache_with_an_object_store_output_is_one_line(tmp_path, s3_bucket):
    """A run on an object store writes its folder locally first, under RAY_KD_STORAGE_CACHE: read-only, that was a
    traceback from the run lock's mkdir after the preflight passed."""
    mirror = tmp_path / "mirror"
    proc = ray_kd_isolated(tmp_path, ["train", f"output_dir={s3_bucket.uri('runs')}", "name=r", *QUICK],
                           mounts={mirror: "ro"}, env={"RAY_KD_STORAGE_CACHE": str(mirror)})
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert (f"{mirror}/s3/{s3_bucket.name}/runs, where a run on s3://{s3_bucket.name}/runs keeps its local copy, is "
            "not a writable folder; point RAY_KD_STORAGE_CACHE at a folder this user can write") in line, line
    assert "secret" not in proc.stdout + proc.stderr


@NAMESPACED
def test_a_download_without_network_is_one_line(tmp_path):
    proc = ray_kd_isolated(tmp_path, ["train", "data.dataset=cifar10", f"data.root={tmp_path / 'cifar'}",
                                      "data.download=true", *QUICK], network=False)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert f"cifar10 could not be downloaded into data.root='{tmp_path / 'cifar'}' (" in line, line
    assert "check the network" in line


def test_stream_mode_skips_an_unreadable_image_when_asked(tmp_path, capsys):
    """data.bad_images=skip is honoured in stream mode too: the batch that holds the file goes without it (said
    once, naming the file); with the default the file is named in one error."""
    root = make_tree(tmp_path / "tree", sizes=12, per_class=(10, 2), classes=2)
    broken = root / "test" / "class1" / "001.png"
    broken.write_bytes(b"\x89PNG not really a png")
    strict = load_dataset(stream_cfg(tmp_path, root, workers=0))
    with pytest.raises(DataError, match=r"001\.png: unreadable image .*remove or replace the file"):
        list(eval_batches(strict.test, strict))
    data = load_dataset(stream_cfg(tmp_path, root, workers=0, bad_images="skip"))
    capsys.readouterr()
    labels = [y for _, y in eval_batches(data.test, data)] + [y for _, y in eval_batches(data.test, data)]
    assert sum(len(y) for y in labels) == 2 * (len(data.test.labels) - 1)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ray-kd: warning: skipped an unreadable image (data.bad_images=skip): {broken} "
                   "(cannot identify image file '" + str(broken) + "')"], err
    assert sum(len(y) for _, y in seeded_batches(data, 8, seed=0, epoch=0)) == len(data.train.labels)


def test_a_stream_run_with_an_unreadable_image_trains_with_skip(tmp_path, mlflow_uri, capsys):
    root = make_tree(tmp_path / "tree", sizes=12, per_class=(6, 2), classes=2)
    (root / "train" / "class0" / "002.png").write_bytes(b"not an image")
    common = [f"output_dir={tmp_path / 'runs'}", "data.dataset=imagefolder", f"data.root={root}", "data.mode=stream",
              "data.image_size=12", "data.workers=0", "data.batch_size=4", f"data.cache_dir={tmp_path / 'cache'}",
              "method.name=ce", "students=[{model: resnet8}]", *QUICK]
    assert main(["train", "name=strict", *common]) == 2
    assert "002.png: unreadable image" in capsys.readouterr().err
    assert main(["train", "name=skip", "data.bad_images=skip", *common]) == 0
    assert "skipped an unreadable image (data.bad_images=skip)" in capsys.readouterr().err


# --- small ---------------------------------------------------------------------------------------------------------

def test_epoch_lines_after_a_fallback_are_the_epochs_this_start_trains(ray_cluster, tmp_path, mlflow_uri, capsys):
    """epoch_0003's history edited (a wrong figure, two epochs more than its folder): the run falls back to epoch 2,
    and the driver, which follows the newest checkpoint's history for its epoch lines, must not print the damaged
    one's records: one line for epoch 3 and one for 4, with the figures the run trained."""
    import json

    args = ["train", "-c", "configs/digits_dml.yaml", f"output_dir={tmp_path / 'runs'}", "name=h",
            "optim.steps_per_epoch=2", "optim.milestones=[]", "runtime.executor=ray", "runtime.cpus_per_worker=0.5"]
    assert main([*args, "optim.epochs=3"]) == 0
    checkpoints = tmp_path / "runs" / "h" / "checkpoints"
    history = json.loads((checkpoints / "epoch_0003" / "history.json").read_text())
    bogus = [*history, {**history[-1], "epoch": 4}, {**history[-1], "epoch": 5}]
    bogus[2] = {**bogus[2], "student_0/val_acc": 12.3}
    (checkpoints / "epoch_0003" / "history.json").write_text(json.dumps(bogus))
    capsys.readouterr()

    assert main([*args, "optim.epochs=4"]) == 0
    out = capsys.readouterr().out
    assert "resuming after epoch 2" in out, out
    lines = [line for line in out.splitlines() if "val/test top-1" in line]
    assert [line.split()[1] for line in lines] == ["3/4", "4/4"], out
    trained = json.loads((checkpoints / "epoch_0004" / "history.json").read_text())
    for line, record in zip(lines, trained[2:]):
        assert f"student_0 {record['student_0/val_acc']:.1f}/{record['student_0/test_acc']:.1f}" in line, (line, record)


def test_a_sweep_counts_all_the_trials_it_will_run():
    """The stop line's "N of M trials done" counts the whole sweep (a stopped sweep has made only some of its
    trials; tests/test_sweep_reliability.py stops one), a grid's combinations included."""
    from tuning.space import load_space

    assert load_space({"searcher": "random", "num_samples": 3, "params": {
        "optim.lr": {"type": "loguniform", "low": 0.01, "high": 0.1}}}).trials == 3
    assert load_space({"searcher": "grid", "num_samples": 2, "params": {
        "optim.lr": {"type": "grid", "values": [0.01, 0.1]},
        "seed": {"type": "grid", "values": [0, 1, 2]}}}).trials == 12


# --- faults mid-run ------------------------------------------------------------------------------------------------

STATUS = ("import mlflow; c = mlflow.MlflowClient(); "
          "print('status', *[r.info.status for r in c.search_runs([c.get_experiment_by_name('ray-kd').experiment_id])])")
"""Prints the MLflow runs' states: `status FAILED`."""


@NAMESPACED
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_full_disk_mid_run_is_named_and_the_same_command_resumes_once_freed(executor, tmp_path):
    """output_dir on a disk that holds epoch 1's checkpoint but not epoch 2's (a 1 MB tmpfs, a filler file leaving
    300 kB): one line naming the full disk, the MLflow run FAILED, epoch 1 kept and no partial epoch folder; with
    the filler removed, the same command finishes the run. On Ray the run starts a local cluster of its own inside
    the namespace (its workers write to the same small disk)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    args = ["train", "-c", "configs/digits_dml.yaml", f"output_dir={disk}", "name=f", "optim.epochs=3",
            "optim.steps_per_epoch=2", "optim.milestones=[]", f"runtime.executor={executor}",
            "runtime.cpus_per_worker=0.5"]
    command = shlex.join([sys.executable, "-m", "ray_kd.cli", *args])
    status = shlex.join([sys.executable, "-c", STATUS])
    script = (f"mount -t tmpfs -o size=1m tmpfs {disk} && head -c 700000 /dev/zero > {disk}/filler && "
              f"{command}; echo \"exit $?\"; {status}; echo kept $(ls -A {disk}/f/checkpoints); rm {disk}/filler && "
              f"{command}; echo \"exit $?\"; {status}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    first, _, second = out.partition("exit 2\n")
    assert "epoch 1/3  val/test" in first and "epoch 2/3  val/test" not in first and second, out + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ray-kd: error")]
    assert errors == [f"ray-kd: error: the disk is full (No space left on device, ENOSPC) writing the run folder "
                      f"{disk / 'f'}; free space on it (or point output_dir at another disk) and run the same "
                      "command to resume from the last checkpoint"], proc.stderr[-3000:]
    failed, kept, *_ = second.splitlines()
    assert failed == "status FAILED" and kept == "kept epoch_0001", out
    assert "resuming after epoch 1" in second and "epoch 3/3" in second, out
    assert second.rstrip().endswith("exit 0\nstatus FINISHED"), out
