"""The Ray executor and the single-process executor compute the same run: proof the exchange is right."""

import json

import torch
from equivalence import assert_same_run, run_both

from ray_kd.checkpoint import safe_load


def test_dml_three_peers_same_on_ray_and_local(ray_cluster, tmp_path):
    students = "students=[{model: digits_cnn_s}, {model: digits_cnn_s}, {model: digits_cnn_s}]"
    local, remote = run_both(tmp_path, [students])
    assert_same_run(local, remote, ["student_0", "student_1", "student_2"])


def test_kd_same_on_ray_and_local(ray_cluster, tmp_path, digits_teacher):
    """The student trains the same model the teacher only runs forward, so the teacher's worker waits at every
    exchange: it scores itself there, with the numbers the single-process run gets from a pass at the end."""
    local, remote = run_both(tmp_path, ["method.name=kd", f"teacher={{model: digits_cnn_l, checkpoint: {digits_teacher}}}",
                                        "students=[{model: digits_cnn_l}]"])
    assert_same_run(local, remote, ["teacher", "student_0"])
    history = json.loads((remote / "history.json").read_text())
    assert sum(h["teacher/images_scored_waiting"] for h in history) > 0
    # The frozen teacher posts its outputs ahead (teacher.ahead, 2 by default): its forward is lighter than
    # the student's forward and backward, so it gets there, and the students find its outputs waiting.
    assert max(h["teacher/steps_ahead"] for h in history) == 2
    assert "teacher/images_scored_waiting" not in json.loads((local / "history.json").read_text())[0]
    teacher_start = torch.load(digits_teacher, weights_only=True)["state_dict"]
    teacher_end = safe_load(remote / "teacher.pt")["net"]
    for name, tensor in teacher_start.items():  # frozen: not a single weight or BN statistic moved
        torch.testing.assert_close(teacher_end[f"backbone.{name}"], tensor)


def test_workers_started_during_the_checks_end_with_a_run_refused_after_them(ray_cluster, tmp_path, mlflow_uri):
    """`train` starts the role workers while the driver checks (they import torch meanwhile); the run trains on
    them, and a run refused after the checks (its folder holds another config) leaves none of them behind."""
    import pytest
    from ray.util import placement_group_table

    from ray_kd.config import load_config
    from ray_kd.run import train
    from ray_kd.run_folder import RunFolderError

    base = [f"output_dir={tmp_path}", "name=r", "optim.epochs=1", "optim.steps_per_epoch=2", "optim.milestones=[]"]
    assert train(load_config("configs/digits_dml.yaml", base))["epochs"] == 1
    with pytest.raises(RunFolderError, match="another config"):
        train(load_config("configs/digits_dml.yaml", [*base, "optim.epochs=2", "optim.lr=0.1"]))
    groups = placement_group_table().values()
    assert groups and all(g["state"] == "REMOVED" for g in groups), [g["state"] for g in groups]
