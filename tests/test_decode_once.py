"""Stream mode on Ray with roles placed apart: a loader per replica decodes each step's images once for all its roles
(`data.decode=once`), every role trains on identical pixels, and `data.decode=per_role` still decodes per role."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from test_streaming import make_tree

from ray_kd.config import load_config
from ray_kd.data import DataError
from ray_kd.models import create_model
from equivalence import run_on_ray

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH = 2, 8


def stream_overrides(tmp_path, root, *extra) -> list[str]:
    return ["data.dataset=imagefolder", f"data.root={root}", "data.mode=stream", "data.image_size=16",
            f"data.batch_size={BATCH}", "data.workers=1", "data.checksum=true", f"data.cache_dir={tmp_path / 'cache'}",
            "optim.epochs=2", f"optim.steps_per_epoch={STEPS}", "optim.milestones=[1]", f"output_dir={tmp_path}",
            "eval.every=2", *extra]


def kd_overrides(tmp_path) -> list[str]:
    teacher = tmp_path / "teacher.pt"
    torch.save(create_model("resnet8", 3).state_dict(), teacher)
    return ["method={name: kd}", f"teacher={{model: resnet8, checkpoint: {teacher}}}", "students=[{model: resnet8}]"]


DML3 = ["method={name: dml}", "students=[{model: resnet8}, {model: resnet8}, {model: resnet8}]"]


def history(folder: Path) -> list[dict]:
    return json.loads((folder / "history.json").read_text())


REPLICAS2 = ["method={name: dml}", "students=[{model: resnet8}, {model: resnet8}]", "runtime.replicas=2"]


@pytest.mark.parametrize("method, decode, roles", [("kd", "once", ("teacher", "student_0")),
                                                   ("dml3", "once", ("student_0", "student_1", "student_2")),
                                                   ("dml3", "per_role", ("student_0", "student_1", "student_2")),
                                                   ("replicas", "once", ("student_0", "student_1"))])
def test_each_image_is_decoded_once_for_every_role(ray_cluster, tmp_path, method, decode, roles):
    """`replicas`: two replicas of two roles, each replica's loader decoding its shard of every batch."""
    root = make_tree(tmp_path / "tree", per_class=(12, 2))
    chosen = kd_overrides(tmp_path) if method == "kd" else {"dml3": DML3, "replicas": REPLICAS2}[method]
    cfg = load_config(None, stream_overrides(tmp_path, root, f"data.decode={decode}", f"name={method}-{decode}",
                                             "runtime.cpus_per_worker=0.5", *chosen))
    records = history(run_on_ray(cfg, show_progress=False))
    assert len(records) == 2
    for record in records:
        sums = {record[f"{role}/data_checksum"] for role in roles}
        assert len(sums) == 1  # every role trained on the same pixels and labels
        assert record["data/images_trained"] == STEPS * BATCH
        per_image = 1 if decode == "once" else len(roles)  # the old path: one decode per role
        assert record["data/images_decoded"] == per_image * STEPS * BATCH
        assert record["data/decodes_per_image"] == per_image
        assert record["data/decode_cpu_s"] > 0 and record["data/images_decoded_per_s"] > 0
        assert all(record[f"{role}/input_wait_ms"] >= 0 for role in roles)
    assert records[0]["student_0/data_checksum"] != records[1]["student_0/data_checksum"]  # a new draw each epoch


def test_the_progress_line_and_mlflow_say_how_the_input_kept_up():
    from ray_kd.session import input_note
    from ray_kd.tracking import epoch_metrics

    record = {"epoch": 1.0, "student_0/samples_per_s": 100.0, "student_0/loss_ce": 1.0, "student_0/input_wait_ms": 12.4,
              "teacher/samples_per_s": 120.0, "teacher/input_wait_ms": 3.0, "data/images_decoded_per_s": 120.0,
              "data/decode_cpu_ms_per_image": 1.2}
    assert input_note(record) == ", decoded 120 images/s at 1.2 CPU-ms each, input waited 12.4 ms/step"
    assert input_note({"student_0/samples_per_s": 100.0}) == ""  # in memory: nothing decoded per step
    logged = epoch_metrics(record, {})
    assert logged["throughput/student_0/input_wait_ms"] == 12.4 and logged["throughput/data/images_decoded_per_s"] == 120


def test_the_loader_draws_what_each_role_would_draw_itself(ray_cluster, tmp_path):
    """The same batches through the loader as decoded per role: equal checksums, equal losses."""
    root = make_tree(tmp_path / "tree", per_class=(12, 2))
    runs = {}
    for decode in ("once", "per_role"):
        cfg = load_config(None, stream_overrides(tmp_path, root, f"data.decode={decode}", f"name=dml-{decode}",
                                                 "students=[{model: resnet8}, {model: resnet8}]"))
        runs[decode] = history(run_on_ray(cfg, show_progress=False))
    for once, per_role in zip(runs["once"], runs["per_role"]):
        keys = [k for k in once if "/loss_" in k or k.endswith(("/data_checksum", "_acc"))]
        assert len(keys) > 4
        for key in keys:
            assert once[key] == per_role[key], key


def test_an_unreadable_image_through_the_loader_is_one_line(ray_cluster, tmp_path):
    root = make_tree(tmp_path / "tree", per_class=(12, 2))
    cfg = load_config(None, stream_overrides(tmp_path, root, "name=bad", "students=[{model: resnet8}, {model: resnet8}]",
                                             "data.normalize=imagenet"))  # no statistics pass to meet it first
    for file in sorted((root / "train").rglob("*.jpg")):
        file.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"\.jpg: unreadable image \(.*\); remove or replace the file") as err:
        run_on_ray(cfg, show_progress=False)
    assert "\n" not in str(err.value)


# Runs in a process of its own: the test session's `ray_cluster` fixture already holds a one-node cluster here.
SCRIPT = '''
import json, socket, sys
import ray
from ray.cluster_utils import Cluster
from ray_kd.config import load_config
from ray_kd.ray_executor import run_roles, train_worker
from ray_kd.run_storage import RunStorage



def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The dashboard and its agent on ports of their own, apart from the test session's cluster's defaults.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                        "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
                                                        "dashboard_agent_listen_port": free_port()})
cluster.add_node(num_cpus=1, resources={"decode_node": 1})  # CPU-only decoding: no room for a role worker
ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
decoder = [n["NodeID"] for n in ray.nodes() if "decode_node" in n["Resources"]][0]


def probe(config, rank):
    train_worker(config, rank)
    return {"role": ray.get_runtime_context().get_node_id(), "loader": ray.get(config["loaders"][0].node_id.remote())}


cfg = load_config(None, json.loads(sys.argv[1]))
run = RunStorage.of(cfg)
where = run_roles(cfg, run, probe)
print(json.dumps({"decode_node": decoder, "where": where, "last": str(run.checkpoints().latest())}))
ray.shutdown()
cluster.shutdown()
'''


def test_the_loader_runs_on_a_cpu_only_node(tmp_path):
    """`data.loader_resources` puts the decoding on a node of its own (Ray's multi-node simulation): the roles train
    on the head node, fed by the loader on the other."""
    root = make_tree(tmp_path / "tree", per_class=(12, 2))
    overrides = stream_overrides(tmp_path, root, "name=nodes", "runtime.cpus_per_worker=1", "optim.epochs=1",
                                 "data.loader_resources={decode_node: 1, CPU: 1}", *kd_overrides(tmp_path))
    # A Ray temp folder of its own: a `Cluster` head writes its address where a plain `ray.init()` elsewhere on the
    # machine (another test session) would find it and try to join.
    private = tempfile.mkdtemp(prefix="rkd-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "", "RAY_TMPDIR": private}
    try:
        done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(overrides)], capture_output=True, text=True,
                              cwd=REPO, env=env, timeout=240)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    roles = {w["role"] for w in report["where"]}
    loaders = {w["loader"] for w in report["where"]}
    assert loaders == {report["decode_node"]}  # decoded on the CPU-only node
    assert report["decode_node"] not in roles and len(report["where"]) == 2  # teacher and student on the head
    record = history(Path(report["last"]))[-1]
    assert record["data/decodes_per_image"] == 1 and record["teacher/data_checksum"] == record["student_0/data_checksum"]


def test_how_images_are_decoded_is_not_what_a_run_computes(tmp_path):
    """The decoding settings change no number: a run resumes, and compares over seeds, with any of them."""
    from ray_kd.run_folder import fingerprint
    from ray_kd.tracking import protocol_hash

    root = make_tree(tmp_path / "tree", per_class=(12, 2))
    once = load_config(None, stream_overrides(tmp_path, root))
    other = load_config(None, stream_overrides(tmp_path, root, "data.decode=per_role", "data.prefetch=2",
                                               "data.loader_resources={CPU: 2}"))
    assert fingerprint(once) == fingerprint(other)
    flat = lambda cfg: {k: str(v) for k, v in cfg.model_dump().get("data").items()}  # noqa: E731
    assert protocol_hash({f"data.{k}": v for k, v in flat(once).items()}) == \
        protocol_hash({f"data.{k}": v for k, v in flat(other).items()})
    assert fingerprint(load_config(None, stream_overrides(tmp_path, root, "data.image_size=32"))) != fingerprint(once)
