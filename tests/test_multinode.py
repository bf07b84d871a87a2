"""Many nodes: replicas and roles spread over the nodes of Ray's own multi-node simulation (`ray.cluster_utils.Cluster`:
a raylet per "node", each with resources of its own), checkpoints in an `output_dir` given as a file:// URI, and a
worker killed on the second node mid-run: the group restarts from the last checkpoint and the run finishes with
nothing logged twice."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ray_kd.config import ConfigError, load_config
from ray_kd.run_storage import RunStorage
from ray_kd.tracking import client
from test_cluster import _kill, _ray_processes

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4

# Runs in a process of its own: the test session's `ray_cluster` fixture already holds a one-node cluster here.
SCRIPT = '''
import json, os, signal, socket, sys, threading, time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from ray_kd.config import load_config
from ray_kd.run import train
from ray_kd.run_storage import RunStorage


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


out, epochs = Path(sys.argv[1]), int(sys.argv[2])
# The dashboard (list_actors asks it) and its agent on ports of their own, apart from any other cluster's defaults.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                        "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
                                                        "dashboard_agent_listen_port": free_port()})
cluster.add_node(num_cpus=2)
nodes = [cluster.head_node.node_id] + [n.node_id for n in cluster.worker_nodes]


def role_workers(**state):
    filters = [("class_name", "=", "RoleWorker")] + [(k, "=", v) for k, v in state.items()]
    return [{"actor": a.actor_id, "pid": a.pid, "node": a.node_id, "group": a.placement_group_id}
            for a in list_actors(address=cluster.address, filters=filters, limit=1000, detail=True)]


def config(name, *overrides):
    return load_config("configs/digits_dml.yaml", [f"output_dir=file://{out}/runs", f"name={name}",
                                                   "optim.milestones=[]", "optim.steps_per_epoch=6",
                                                   f"runtime.address={cluster.address}", "runtime.replicas=2",
                                                   *overrides])


spread = config("spread", f"optim.epochs={epochs}", "runtime.placement=apart", "runtime.cpus_per_worker=1",
                f"runtime.keep_checkpoints={epochs}", "runtime.max_failures=1", "tracking.log_every_steps=2")
killed = {}
spread_checkpoints = RunStorage.of(spread).run_dir / "checkpoints"


def kill_a_second_node_worker_once_a_checkpoint_lands():
    workers = []
    while len(workers) < 4:  # found beforehand, so the kill follows the first checkpoint at once
        time.sleep(0.2)
        workers = role_workers(state="ALIVE")
    victim = next(w for w in workers if w["node"] != nodes[0])  # on the "node" that is not the driver's
    while not list(spread_checkpoints.glob("epoch_*")):
        time.sleep(0.05)
    killed["saved"] = {p.name: p.stat().st_ino for p in spread_checkpoints.glob("epoch_*")}
    os.kill(victim["pid"], signal.SIGKILL)
    killed["worker"] = victim


killer = threading.Thread(target=kill_a_second_node_worker_once_a_checkpoint_lands, daemon=True)
killer.start()
summaries = [train(spread)]
killer.join(timeout=10)
summaries.append(train(config("together", "optim.epochs=1", "runtime.placement=together",
                              "runtime.cpus_per_worker=2")))
json.dump({"nodes": nodes, "workers": role_workers(), "killed": killed, "summaries": summaries,
           "checkpoints": {p.name: p.stat().st_ino for p in spread_checkpoints.glob("epoch_*")}},
          open(out / "layout.json", "w"))
ray.shutdown()
cluster.shutdown()
'''


def test_output_dir_is_a_path_or_a_file_uri(tmp_path):
    """A file:// URI is resolved (pyarrow.fs) to the local path every run folder use reads; an object store's URI
    is kept (a local mirror stands for it: tests/test_remote_storage.py); other schemes and file URIs that are
    not a local absolute path are refused in one line."""
    run_dir = lambda output_dir: RunStorage.of(load_config(None, [f"output_dir={output_dir}"])).run_dir  # noqa: E731
    assert run_dir(f"file://{tmp_path}/a%20b") == tmp_path / "a b" / "digits-dml"
    assert run_dir(tmp_path) == tmp_path / "digits-dml"
    assert load_config(None, ["output_dir=s3://bucket/runs"]).output_dir == "s3://bucket/runs"
    with pytest.raises(ConfigError, match=r"^config error at output_dir: ftp:// is not supported \(ftp://host/runs\): "
                                          r"output_dir is a local path, a file:// URI or an object store \(s3://, "
                                          r"gs://, gcs://, abfs://, abfss://, hdfs://, viewfs://\)$"):
        load_config(None, ["output_dir=ftp://host/runs"])
    with pytest.raises(ConfigError, match=r"^config error at output_dir: 'file:runs' is not a local file URI \(.*"
                                          r"\); write file:///absolute/path$"):
        load_config(None, ["output_dir=file:runs"])


def test_replicas_spread_over_nodes_and_survive_a_killed_worker(tmp_path, mlflow_uri):
    root = tempfile.mkdtemp(prefix="rkm", dir="/tmp")  # Ray's temp folder of its own (and short: socket paths)
    uri = mlflow_uri
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": root,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every "node" on 127.0.0.1, as ray-kd's local cluster
           "MLFLOW_TRACKING_URI": uri}
    try:
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(EPOCHS)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    finally:
        _kill(_ray_processes(root))
        shutil.rmtree(root, ignore_errors=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    layout = json.loads((tmp_path / "layout.json").read_text())
    nodes, killed = layout["nodes"], layout["killed"]
    assert "worker" in killed, "no worker was killed"
    groups = {}  # placement group -> the nodes its RoleWorkers ran on
    for worker in layout["workers"]:
        groups.setdefault(worker["group"], []).append(worker["node"])
    first = groups.pop(killed["worker"]["group"])
    (restarted,), (together,) = ([g for g in groups.values() if len(g) == n] for n in (4, 2))
    # PACK fills as few nodes as hold the bundles: 2 replicas x 2 roles at 1 CPU each need both 2-CPU "nodes", 2
    # workers on each, before and after the restart; together, one replica (2 CPUs) per node.
    assert sorted(first) == sorted(restarted) == sorted(nodes * 2), layout["workers"]
    assert sorted(together) == sorted(nodes), layout["workers"]
    assert "restarting the workers from the last checkpoint (1 of runtime.max_failures=1)" in output, output[-4000:]

    # The restart resumed: each checkpoint folder written before the kill is still the same folder at the end (a
    # restart from scratch would have replaced it), and the run folder under the file:// URI holds the whole run.
    assert killed["saved"] and all(layout["checkpoints"][name] == inode for name, inode in killed["saved"].items())
    assert sorted(layout["checkpoints"]) == [f"epoch_{e:04d}" for e in range(1, EPOCHS + 1)]
    run_dir = tmp_path / "runs" / "spread"
    assert (run_dir / "summary.json").is_file() and (run_dir / "best_student.pt").is_file()

    spread, joined = layout["summaries"]
    assert spread["epochs"] == EPOCHS and joined["epochs"] == 1
    mlflow = client(uri)
    run = mlflow.get_run(spread["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for metric in run.data.metrics:  # nothing logged twice: epoch and step metrics alike
        steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, metric)]
        assert len(steps) == len(set(steps)), (metric, steps)
    assert [m.step for m in mlflow.get_metric_history(run.info.run_id, "student_0/val_acc")] == \
        list(range(1, EPOCHS + 1))
