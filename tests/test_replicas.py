"""Data-parallel replicas (`runtime.replicas`): two replicas of every role, placed together or apart, compute the
single-process run on the global batch (BatchNorm synchronised), for KD, DML, SOKD and MTKD-SSR."""

import pytest
from equivalence import assert_same_run, run_local, run_on_ray

from ray_kd.config import ConfigError, load_config

COMMON = ["optim.epochs=2", "optim.steps_per_epoch=4", "optim.milestones=[1]", "data.batch_size=32"]
CASES = {
    "dml": ["students=[{{model: digits_cnn_s}}, {{model: digits_cnn_s}}]"],
    "kd": ["method.name=kd", "teacher={{model: digits_cnn_l, checkpoint: {teacher}}}", "students=[{{model: digits_cnn_s}}]"],
    "sokd": ["method.name=sokd", "teacher={{model: digits_cnn_l, checkpoint: {teacher}}}",
             "students=[{{model: digits_cnn_s}}]"],
    # the teacher's stage heads train on its worker, the student's heads and adapters on its own
    "mtkd_ssr": ["method.name=mtkd_ssr", "method.stage_alignment=deepest",
                 "teacher={{model: digits_cnn_l, checkpoint: {teacher}}}", "students=[{{model: digits_cnn_s}}]"],
}
ROLES = {"dml": ["student_0", "student_1"], "kd": ["teacher", "student_0"], "sokd": ["teacher", "student_0"],
         "mtkd_ssr": ["teacher", "student_0"]}


# Each placement with several methods (KD with both: its teacher posts ahead only where it has a worker of its own);
# placement and method meet in the exchange and the gradient reduce, which every method goes through alike.
PLACEMENTS = {"dml": ["together"], "kd": ["together", "apart"], "sokd": ["apart"], "mtkd_ssr": ["together"]}


@pytest.mark.parametrize("method", list(CASES))
def test_two_replicas_equal_one_process_on_the_global_batch(ray_cluster, tmp_path, digits_teacher, method):
    overrides = [o.format(teacher=digits_teacher) for o in CASES[method]] + COMMON + [f"output_dir={tmp_path}"]
    local = run_local(load_config(None, overrides + ["name=local", "runtime.executor=local"]), show_progress=False)
    for placement in PLACEMENTS[method]:
        remote = run_on_ray(load_config(None, overrides + [f"name={placement}", "runtime.replicas=2",
                                                           f"runtime.placement={placement}", "runtime.sync_bn=true",
                                                           "runtime.cpus_per_worker=0.25"]))
        assert_same_run(local, remote, ROLES[method])


def test_replicas_need_the_ray_executor_and_a_batch_to_split():
    from ray_kd.run import preflight

    with pytest.raises(ConfigError, match="runtime.replicas=2 needs runtime.executor=ray"):
        load_config(None, ["runtime.replicas=2", "runtime.executor=local"])
    with pytest.raises(ConfigError, match="data.batch_size=3 cannot be split into runtime.replicas=4 shards"):
        load_config(None, ["runtime.replicas=4", "data.batch_size=3"])
    with pytest.raises(ConfigError, match="the epoch's last batch holds 1 of the 1,293 training images, too few to "
                                          "split into runtime.replicas=2 shards"):
        preflight(load_config(None, ["runtime.replicas=2", "data.batch_size=1292"]))
