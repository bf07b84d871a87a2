"""The `eval` section and the frozen role: fewer evaluations, the same numbers where one is made."""

import json
import time

import pytest
import torch

from ray_kd.config import ConfigError, load_config
from ray_kd.datasets import load_dataset
from ray_kd.evaluation import OBJECTIVE, Evaluator, is_frozen, require_val_every_epoch, splits_at
from ray_kd.roles import RoleRunner
from ray_kd.run import train
from ray_kd.roles import all_roles
from ray_kd.tracking import client, describe

QUICK = ["runtime.executor=local", "optim.steps_per_epoch=4", "optim.milestones=[1]"]


def test_splits_at_every_n_epochs_and_always_all_at_the_last():
    cfg = load_config(None, ["optim.epochs=5", "eval.every=2", "eval.splits=[val]"])
    assert [splits_at(cfg, e) for e in range(1, 6)] == [(), ("val",), (), ("val",), ("val", "test")]
    assert [splits_at(load_config(None, ["optim.epochs=2"]), e) for e in (1, 2)] == [("val", "test")] * 2


def test_eval_section_rejects_bad_values_in_one_line():
    with pytest.raises(ConfigError, match="eval.every"):
        load_config(None, ["eval.every=0"])
    with pytest.raises(ConfigError, match="eval.splits"):
        load_config(None, ["eval.splits=[train]"])
    with pytest.raises(ConfigError, match="set eval.every=1"):
        require_val_every_epoch(load_config(None, ["eval.every=2"]))


def test_sparse_evaluation_reaches_summary_plot_and_mlflow(mlflow_uri, tmp_path):
    cfg = load_config("configs/digits_dml.yaml", QUICK + [
        f"output_dir={tmp_path}", "name=sparse", "optim.epochs=3", "eval.every=2", "eval.splits=[val]"])
    summary = train(cfg)
    history = json.loads((tmp_path / "sparse" / "checkpoints" / "epoch_0003" / "history.json").read_text())
    assert not any(k.endswith("_acc") for k in history[0]) and OBJECTIVE not in history[0]
    assert "student_0/val_acc" in history[1] and "student_0/test_acc" not in history[1] and OBJECTIVE in history[1]
    assert {"student_0/val_acc", "student_0/test_acc", OBJECTIVE} <= set(history[2])
    assert summary["epochs"] == 3 and summary["roles"]["student_0"]["last_test_acc"] == history[2]["student_0/test_acc"]
    best = summary["roles"]["student_0"]
    assert best["best_epoch"] in (2, 3) and best["val_acc_at_best"] == history[best["best_epoch"] - 1]["student_0/val_acc"]
    assert (tmp_path / "sparse" / "accuracy.png").is_file()
    mlflow = client(mlflow_uri)
    assert [m.step for m in mlflow.get_metric_history(summary["mlflow_run_id"], "student_0/val_acc")] == [2, 3]
    note = mlflow.get_run(summary["mlflow_run_id"]).data.tags["mlflow.note.content"]
    assert f"at its best-val epoch {summary['headline']['best_epoch']} of 3" in note
    # A best epoch whose test split was not scored (epoch 2 here, when it wins) is described without a test figure.
    unscored = {**summary, "headline": {**summary["headline"], "best_epoch": 2, "test_acc_at_best_val": None}}
    assert "at its best-val epoch 2 of 3 (test not scored there; last epoch test" in describe(cfg, "distillation",
                                                                                             unscored)


def _runners(cfg):
    data, method = load_dataset(cfg.data), cfg.method.build()
    return data, [RoleRunner(role, i, method, data, cfg.optim, cfg.seed, torch.device("cpu"), 4)
                  for i, role in enumerate(all_roles(cfg))]  # noqa


def test_only_a_role_that_can_never_change_counts_as_frozen(digits_teacher):
    teacher = f"teacher={{model: digits_cnn_l, checkpoint: {digits_teacher}}}"
    frozen = {}
    for method in ("kd", "sokd", "mtkd_ssr"):
        _, runners = _runners(load_config(None, [f"method.name={method}", teacher]))
        frozen[method] = {r.role.name for r in runners if is_frozen(r)}
    assert frozen == {"kd": {"teacher"}, "sokd": set(), "mtkd_ssr": set()}  # a trained bridge / heads
    _, runners = _runners(load_config(None, ["method.name=sokd", teacher, "method.teacher_bn=train"]))
    assert not is_frozen(runners[0])


def test_a_frozen_teacher_is_scored_once_with_the_numbers_a_fresh_evaluation_gives(digits_teacher):
    cfg = load_config(None, ["method.name=kd", f"teacher={{model: digits_cnn_l, checkpoint: {digits_teacher}}}",
                             "students=[{model: digits_cnn_s}]", "optim.epochs=3"])
    data, runners = _runners(cfg)
    teacher, student = runners
    images = {"teacher": 0, "student_0": 0}
    original = RoleRunner.correct

    def counted(self, x, y):
        images[self.role.name] += len(y)
        return original(self, x, y)

    RoleRunner.correct = counted
    try:
        evaluator = Evaluator(cfg, runners, data)
        scores = [evaluator.scores(r, epoch) for epoch in (1, 2, 3) for r in runners]
    finally:
        RoleRunner.correct = original
    both = len(data.val.labels) + len(data.test.labels)
    assert images == {"teacher": both, "student_0": 3 * both}  # the teacher: val once, test once
    fresh = teacher.evaluate(data)  # in eval_batches' 512s, not FROZEN_CHUNK's 32s
    assert scores[0] == scores[2] == scores[4] == fresh and set(fresh) == {"teacher/val_acc", "teacher/test_acc"}


def test_a_frozen_role_alone_in_its_process_is_scored_in_its_waits_within_the_budget(digits_teacher):
    cfg = load_config(None, ["method.name=kd", f"teacher={{model: digits_cnn_l, checkpoint: {digits_teacher}}}",
                             "students=[{model: digits_cnn_s}]"])
    data, (teacher, student) = _runners(cfg)
    together = Evaluator(cfg, [teacher, student], data)  # the single-process executor: it never waits
    together.use_wait(1.0)
    assert together.images_while_waiting == 0
    alone = Evaluator(cfg, [teacher], data)  # a Ray worker holding only the teacher
    alone.use_wait(0.0)
    assert alone.images_while_waiting == 0  # no wait measured yet
    chunk = alone.frozen["teacher"]
    chunk.advance(1e-9)  # one chunk, to know its cost
    for _ in range(3):  # three steps, each measured (two steps late) to wait 40 chunks' time
        start = time.perf_counter()
        alone.use_wait(40 * chunk.chunk_s)
        assert time.perf_counter() - start < 40 * chunk.chunk_s  # never past the wait it was given
    assert 0 < alone.images_while_waiting < len(data.val.labels) + len(data.test.labels)
    assert alone.scores(teacher, cfg.optim.epochs) == teacher.evaluate(data)  # finished on demand
