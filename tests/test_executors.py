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
    assert "teacher/images_scored_waiting" not in json.loads((local / "history.json").read_text())[0]
    teacher_start = torch.load(digits_teacher, weights_only=True)["state_dict"]
    teacher_end = safe_load(remote / "teacher.pt")["net"]
    for name, tensor in teacher_start.items():  # frozen: not a single weight or BN statistic moved
        torch.testing.assert_close(teacher_end[f"backbone.{name}"], tensor)
