"""The Ray executor: one Ray actor per role, all in lockstep, exchanging through a collective.

Rank r runs role r. Every worker builds its own role (the driver's in-memory dataset
reaches it through Ray's object store, one copy per node; in stream mode a loader
actor per replica decodes each step's batch once for all its roles, `ray_kd.loader`),
draws the same batches, and calls the same `Session` code as the single-process
executor; only the exchange (an all_gather in the group's torch.distributed process
group) differs.
Checkpoints: each rank writes its own roles' files into the epoch's folder of the
run's checkpoint store (`ray_kd.run_storage`); re-running with the same run name
resumes from the latest good one.

The group is plain actors in one placement group, not Ray Train: a Train run starts
a controller and four helper actors before the workers (its worker-group start took
12.6-15.9 s on 2 cores against 1.9-2.1 s for this group, measured side by side for
issue 14), and what Train added here (checkpoint folders, restarts after a worker's
death) is a few lines.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import ray
import torch

from ray_kd.checkpoint import CheckpointError
from ray_kd.config import RunConfig
from ray_kd.data import Dataset, as_arrays, from_arrays
from ray_kd.datasets import load_dataset
from ray_kd.errors import UserError, cause_of, disk_full, first_line
from ray_kd.exchange import CollectiveExchange, LocalExchange
from ray_kd.loader import LoaderFeed, decodes_once, start_loaders
from ray_kd.preflight import PreflightError, answers, check_address, cluster_address, running_cluster
from ray_kd.progress import ProgressDisplay, Status, StepMetricLogger, StepMonitor, group_status, this_process
from ray_kd.replicas import Mesh, build_mesh, processes_per_replica, world_size
from ray_kd.roles import all_roles
from ray_kd.run_storage import RunStorage
from ray_kd.session import Session, fit, progress_line
from ray_kd.worker_deaths import death_cause


class ClusterError(UserError, RuntimeError):
    """The cluster cannot ever hold this run (too few CPUs/GPUs), or cannot be reached."""


def train_worker(config: dict, rank: int) -> None:
    """What every role worker runs: its role of the run, in lockstep with the others."""
    from ray_kd.tracking import MetricSync, system_metrics

    cfg, run = RunConfig.model_validate(config["run"]), config["storage"]
    torch.set_num_threads(cfg.runtime.threads_per_worker)
    roles = all_roles(cfg)
    mesh = build_mesh(cfg, rank, len(roles))
    exchange = (CollectiveExchange([r.name for r in roles], rank % mesh.processes, mesh.exchange_group)
                if mesh.processes > 1 else LocalExchange(distributed=True))
    lead = rank == 0
    sync = MetricSync(config["tracking_uri"], config["run_id"]) if lead and config.get("run_id") else None
    log_every = cfg.tracking.log_every_steps if config.get("run_id") else 0  # the same on every rank
    monitor = StepMonitor(cfg.optim.epochs, exchange, log_every,
                          StepMetricLogger(sync.client, sync.run_id) if sync and log_every else None, this_process)
    shared = config.get("dataset")  # the driver's in-memory dataset, held once per node by Ray's object store
    data = from_arrays(ray.get(shared[0])) if shared else None
    feed = None
    if config.get("loaders"):  # stream mode: the replica's loader decodes the training batches (ray_kd.loader)
        data = load_dataset(cfg.data)
        feed = LoaderFeed(config["loaders"][mesh.replica], rank % mesh.processes, data, cfg.data.batch_size,
                          cfg.optim.steps_per_epoch)
    session = Session(cfg, mesh.roles, exchange, worker_device(config), data, monitor=monitor, mesh=mesh, feed=feed)
    store = run.checkpoints(rank, exchange.gather_objects)
    node = worker_name(roles, mesh, sync.names if sync else {})
    with system_metrics(config["tracking_uri"], config.get("run_id"), node, cfg.tracking.system_metrics_interval):
        fit(session, store, sync)


def worker_name(roles: list, mesh: Mesh, names: dict[str, str]) -> str:
    """How a worker's system metrics are named: its role (as the run shows it), and its replica when several."""
    role = names.get(roles[mesh.roles[0]].name, roles[mesh.roles[0]].name) if mesh.processes > 1 else "roles"
    return role if mesh.replicas == 1 else f"{role}-replica{mesh.replica}"


def rank_name(cfg: RunConfig, roles: list, rank: int) -> str:
    """`role teacher (rank 0)`, with its replica when there are several."""
    replica, process = divmod(rank, processes_per_replica(cfg, len(roles)))
    what = f"role {roles[process].name}" if cfg.runtime.placement == "apart" or len(roles) == 1 else "the roles"
    return f"{what} (rank {rank}{f', replica {replica}' if cfg.runtime.replicas > 1 else ''})"


def worker_device(config: dict) -> torch.device:
    """The GPU Ray gave this worker (it sees only that one), or the CPU."""
    return torch.device("cuda", 0) if config["gpu"] else torch.device("cpu")


@ray.remote(max_concurrency=2)
class RoleWorker:
    """One process of the role group: rank r runs role r's share of the run (`fn(config, rank)`) inside the
    group's torch.distributed process group. Two threads: the driver asks `status` while `run` runs."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        # Imported as the worker starts, while the driver still checks and opens its MLflow run, not at the run's
        # first optimizer: torch imports torch._dynamo there (1.9 s on 2 cores), and rank 0 logs through MLflow.
        import torch._dynamo  # noqa: F401
        import ray_kd.tracking  # noqa: F401

    def free_address(self) -> str:
        """host:port for the group's rendezvous: a socket bound to this (rank 0's) node's address, 127.0.0.1
        on a local cluster, held open for rank 0's TCPStore (which, given a host and port instead, listens on
        every interface)."""
        import socket

        host = ray.util.get_node_ip_address()
        self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.bind((host, 0))
        self.listener.listen(self.world_size)
        return f"{host}:{self.listener.getsockname()[1]}"

    def run(self, fn: Callable[[dict, int], object], config: dict, address: str, backend: str):
        import torch.distributed as dist
        from torch.distributed.constants import default_pg_timeout

        host, _, port = address.rpartition(":")
        bind_collectives_to(host)
        listen_fd = self.listener.detach() if self.rank == 0 else None  # the store owns it from here
        store = dist.TCPStore(host, int(port), self.world_size, self.rank == 0, default_pg_timeout,
                              master_listen_fd=listen_fd)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size)
        try:
            return fn(config, self.rank)
        finally:
            dist.destroy_process_group()

    def status(self) -> Status | None:
        """What this rank is doing now (its monitor's latest status), for the driver to show."""
        from ray_kd import progress  # not this module's global: Ray ships this class's code by value, with copies

        return progress.this_process.status


def bind_collectives_to(host: str) -> None:
    """On a local cluster (its node's address `host` is 127.0.0.1) make gloo's connections and NCCL's bootstrap
    listen on the loopback interface too: gloo binds where the hostname resolves, NCCL any other interface
    first. A GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME the worker has is kept."""
    import ipaddress

    import psutil

    if not ipaddress.ip_address(host).is_loopback:
        return
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == host for a in addresses):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", name)
            return


class WorkerDied(Exception):
    """A role worker's process is gone (killed, out of memory, its node lost): the group can restart."""

    def __init__(self, rank: int, reason: str):
        super().__init__(reason)
        self.rank = rank


class RoleGroup:
    """One worker per role, placed as one placement group (a GPU each when the run uses GPUs).

    Ray owns the group's fate: the workers and their placement group die with the process that started them
    (a driver, or a Tune trial stopped early), so nothing leaks."""

    def __init__(self, cfg: RunConfig, gpu: bool):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        n = world_size(cfg, len(all_roles(cfg)))
        bundle = {"CPU": cfg.runtime.cpus_per_worker, **({"GPU": 1} if gpu else {})}
        self.group = placement_group([bundle] * n, strategy="PACK")
        if not self.group.wait(timeout_seconds=10):
            print(f"waiting for {n} x {bundle} to be free on the cluster (other work holds them)", flush=True)
            ray.get(self.group.ready())
        self.workers = [
            RoleWorker.options(num_cpus=cfg.runtime.cpus_per_worker, num_gpus=1 if gpu else 0,
                               scheduling_strategy=PlacementGroupSchedulingStrategy(
                                   self.group, placement_group_bundle_index=r))
            .remote(r, n)
            for r in range(n)]
        self.loaders = start_loaders(cfg, self.group, len(all_roles(cfg))) if decodes_once(cfg.data) else []

    def run(self, fn, config: dict, backend: str, poll: Callable[[list], None] = lambda statuses: None,
            every: float = 0.5) -> list:
        """Every rank's `fn(config, rank)`, calling `poll(statuses)` every `every` seconds meanwhile with what each
        rank is doing (`statuses`), and once more at the end with none. A failed rank ends the wait at once:
        WorkerDied if any worker's process is gone, else the failure itself."""
        address = ray.get(self.workers[0].free_address.remote())
        config = {**config, "loaders": self.loaders}
        refs = [w.run.remote(fn, config, address, backend) for w in self.workers]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=every)
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as err:
                    raise self._failure(refs, refs.index(ref), err) from None
            poll(self.statuses(every))
        poll([])
        return ray.get(refs)

    def statuses(self, timeout: float) -> list[Status | None]:
        """Each rank's latest status (`RoleWorker.status`), in rank order; None for a rank that has none or does
        not answer within `timeout` seconds (starting, or gone: `run`'s own failure says so)."""
        refs = [w.status.remote() for w in self.workers]
        answered, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref) if ref in answered else None)
            except ray.exceptions.RayError:
                out.append(None)
        return out

    def _failure(self, refs: list, rank: int, err: Exception) -> Exception:
        """What the group's first failure means: a peer of a dead worker fails too (its collective breaks), so
        give the others a moment to report before telling a death from an error."""
        errors = {rank: err}
        done, _ = ray.wait([r for r in refs if r != refs[rank]], num_returns=len(refs) - 1, timeout=5)
        for ref in done:
            try:
                ray.get(ref)
            except Exception as other:
                errors[refs.index(ref)] = other
        for r, e in sorted(errors.items()):
            if isinstance(e, ray.exceptions.RayActorError):
                return WorkerDied(r, death_cause(str(e), session_logs()))
        # the rank that hit the cause (a full disk, a bad input) over its peers, whose collectives it broke
        return next((e for _, e in sorted(errors.items()) if cause_of(e, UserError) or disk_full(e, "")), err)

    def shutdown(self) -> None:
        """Kill the workers and free their placement group; a second call does nothing."""
        from ray.util.placement_group import remove_placement_group

        for actor in self.workers + self.loaders:
            ray.kill(actor)
        self.loaders = []
        if self.workers:
            remove_placement_group(self.group)
        self.workers = []

    def abandon(self) -> None:
        """Forget the workers without a word to the cluster: on a lost cluster there is nothing left to kill, and
        asking its head to would wait for the head to come back."""
        self.workers, self.loaders = [], []


def start_group(cfg: RunConfig) -> RoleGroup:
    """The run's role workers, started now (they import what they run while the caller goes on), once the
    cluster is known to hold them."""
    gpu = use_gpu(cfg)
    check_fits(cfg, gpu)
    return RoleGroup(cfg, gpu)


def use_gpu(cfg: RunConfig) -> bool:
    if cfg.runtime.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return cfg.runtime.use_gpu == "yes"


def connect(cfg: RunConfig) -> None:
    """Join the cluster in runtime.address / RAY_ADDRESS (as under `ray job submit`), or start a local one.

    A local cluster is this run's own, even while a `ray start` cluster runs on the machine (a plain
    `ray.init()` would join that one, and refuse the CPU count a local cluster is given); one line says how
    to run on that cluster instead. It serves no dashboard web page (Ray still starts its dashboard process, without
    it) and collects no metrics, and binds every port it opens to 127.0.0.1 (see docs/network.md). The caller's SIGTERM/SIGINT handlers (a clean stop,
    `ray_kd.stopping`) outlive `ray.init`, which installs Ray's own."""
    if ray.is_initialized():
        return
    address = cluster_address(cfg)
    # Worker logs stay in Ray's log files unless asked for: the driver prints progress itself.
    kwargs = dict(log_to_driver=cfg.runtime.worker_logs, logging_level="ERROR")
    with signal_handlers_kept():
        if address:
            if on_loopback(address):  # a loopback-only cluster (the README's `ray start`) is joined the same way
                loopback_only()
            ray.init(address=address, **kwargs)
        else:
            running = running_cluster()
            if running:
                print(f"note: a Ray cluster is running at {running}; this run starts a local cluster of its own "
                      f"(set runtime.address={running} or RAY_ADDRESS to run on that one)", flush=True)
            loopback_only()
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                     _system_config={"enable_metrics_collection": False}, **kwargs)


@contextmanager
def signal_handlers_kept():
    """Put back the SIGTERM and SIGINT handlers the block replaced (main thread only: only it has them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in kept.items():
            signal.signal(signum, handler)


def on_loopback(address: str) -> bool:
    """Whether a cluster address (`host:port`, `ray://host:port`, `auto`) is on this machine's loopback."""
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die

        address = canonicalize_bootstrap_address_or_die("auto")
    host = address.split("://", 1)[-1].rpartition(":")[0]
    return host == "localhost" or host.startswith("127.")


def loopback_only() -> None:
    """Make the local cluster this process starts listen on 127.0.0.1 only.

    On Linux Ray gives a node the host's routable address (a 127.0.0.1 asked for is rewritten to it) and
    binds its servers there or on every interface. Where Ray does not build multi-node clusters (its
    macOS/Windows default, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`) the node's address is 127.0.0.1 and
    every server binds loopback. A local cluster is one node, so nothing is lost; the variable is set in
    the environment the cluster's processes inherit, and in the constant this process already read.
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def check_fits(cfg: RunConfig, gpu: bool) -> None:
    """Fail now, not hang forever, when the cluster can never place the run's workers (one per role per replica
    apart, one per replica together)."""
    if cfg.runtime.backend == "nccl" and not gpu:
        raise ClusterError(f"runtime.backend=nccl runs on GPUs, but this run's workers get none (runtime.use_gpu="
                           f"{cfg.runtime.use_gpu}, the cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs); "
                           "set runtime.backend=gloo (or auto), or run where there are GPUs")
    roles, replicas = len(all_roles(cfg)), cfg.runtime.replicas
    n = world_size(cfg, roles)
    layout = (f"{roles} roles x {replicas} replicas, placed {cfg.runtime.placement}: " if replicas > 1 else "")
    have = ray.cluster_resources()
    need_cpu = n * cfg.runtime.cpus_per_worker
    if need_cpu > have.get("CPU", 0):
        raise ClusterError(f"{layout}{n} role workers x runtime.cpus_per_worker={cfg.runtime.cpus_per_worker} need "
                           f"{need_cpu:g} CPUs but the cluster has {have.get('CPU', 0):g}; lower "
                           "runtime.cpus_per_worker or runtime.replicas, or add nodes")
    for resource, amount in cfg.data.loader_resources.items() if decodes_once(cfg.data) else ():
        need = replicas * amount + (need_cpu if resource == "CPU" else 0)
        if need > have.get(resource, 0):
            raise ClusterError(f"{replicas} data loader(s) x data.loader_resources {resource}={amount:g} "
                               f"{'beside the role workers ' if resource == 'CPU' else ''}need {need:g} {resource} but "
                               f"the cluster has {have.get(resource, 0):g}; lower data.loader_resources or add nodes")
    if gpu and n > have.get("GPU", 0):
        raise ClusterError(f"{layout}{n} role workers need {n} GPUs but the cluster has {have.get('GPU', 0):g}; "
                           "set runtime.use_gpu=no, lower runtime.replicas, or add GPUs")


def run_roles(cfg: RunConfig, run: RunStorage, fn: Callable[[dict, int], object] = None,
              tracking_uri: str | None = None, run_id: str | None = None,
              poll: Callable[[list], None] = lambda statuses: None, dataset: Dataset | None = None,
              group: RoleGroup | None = None) -> list:
    """Every rank's `fn(config, rank)` (default: train_worker) on one worker per role, all in one process group.

    A worker that dies (killed, out of memory, its node lost) takes the group down and a new one starts, up to
    runtime.max_failures times; train_worker then resumes from the last checkpoint. An error a worker raises
    ends the run with the worker's own message (a NaN loss, a bad checkpoint). Benchmarks pass their own `fn`.
    An in-memory `dataset` the driver loaded goes to the workers through the object store (`config["dataset"]`:
    one copy per node, mapped by its workers) instead of each worker loading and holding its own. A `group`
    started beforehand (`start_group`, while the driver checked) runs the first attempt. `run`: the run's storage
    (the driver's), handed to every worker as `config["storage"]`."""
    fn = fn or train_worker
    gpu = use_gpu(cfg)
    check_fits(cfg, gpu)
    backend = cfg.runtime.backend if cfg.runtime.backend != "auto" else ("nccl" if gpu else "gloo")
    config = {"run": cfg.with_absolute_paths().model_dump(), "storage": run, "tracking_uri": tracking_uri,
              "run_id": run_id,
              "gpu": gpu, "dataset": [ray.put(as_arrays(dataset))] if isinstance(dataset, Dataset) else None}
    roles = all_roles(cfg)
    deaths = []  # the newest checkpoint at each death: no progress between deaths means a resume dies too
    for attempt in range(cfg.runtime.max_failures + 1):
        group = group if attempt == 0 and group is not None else RoleGroup(cfg, gpu)
        try:
            return group.run(fn, config, backend, poll)
        except WorkerDied as died:
            role = rank_name(cfg, roles, died.rank)
            lost = lost_head()
            if lost:
                group.abandon()
                atexit.unregister(ray.shutdown)  # Ray's own shutdown at exit would ask the lost head, and wait
                raise ClusterLostError(
                    f"the Ray cluster at {cluster_address(cfg) or lost} was lost mid-run: its head ({lost}) no longer "
                    f"answers and {role} died with it; checkpoints are kept in {run.where()}: start the cluster "
                    "again (or unset runtime.address to run on a local one) and run the same command to resume"
                ) from None
            newest = run.checkpoints().latest()
            deaths.append(newest.name if newest else None)
            if attempt == cfg.runtime.max_failures:
                raise WorkerFailedError(_gave_up(cfg, run, role, died, deaths)) from None
            print(f"{role} died ({died}); restarting the workers from the last checkpoint "
                  f"({attempt + 1} of runtime.max_failures={cfg.runtime.max_failures})", flush=True)
        except ray.exceptions.RayTaskError as err:
            raise explain_failure(err, run) from err  # the driver names a cause it finds there (a locked store)
        finally:
            group.shutdown()


def lost_head() -> str | None:
    """The GCS address of this driver's cluster when its head no longer accepts a connection (killed, its machine
    gone), else None. A role that died with its head is a lost cluster, not a worker to restart: Ray's driver would
    wait a minute for the head, then end the process without a word of ours."""
    gcs = ray.get_runtime_context().gcs_address
    return None if answers(gcs, timeout=2) else gcs


def _gave_up(cfg: RunConfig, run: RunStorage, role: str, died: WorkerDied, deaths: list[str | None]) -> str:
    """The last line of a run whose workers kept dying: why, and whether resuming can help."""
    kept = f"checkpoints are kept in {run.where()}"
    if len(deaths) > 1 and len(set(deaths)) == 1:
        where = f"after {deaths[0]}" if deaths[0] else "before the first checkpoint"
        return (f"{role} died {len(deaths)} times at the same point ({where}): {died}; resuming would die the "
                f"same way: fix that cause first (out of memory: lower data.batch_size or data.workers, or give "
                f"each worker more memory); {kept}")
    return (f"{role} died after runtime.max_failures={cfg.runtime.max_failures} restarts: {died}; {kept}: "
            "run the same command to resume")


def session_logs() -> Path | None:
    """This node's Ray session log folder (a worker's stderr is there when it ran on this node)."""
    try:
        return Path(ray._private.worker._global_node.get_logs_dir_path())
    except AttributeError:  # not connected, or a client connection without a local node
        return None


class RayExecutor:
    """Runs a run's roles on a Ray cluster, one worker per role (see the module's docstring); built by
    `ray_kd.run.executor_for`."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.group = cfg, None

    def start(self, checks: Callable[[], Dataset]) -> Dataset:
        """The cluster joined or started and the role workers started while `checks` (the driver's preflight)
        runs in a thread (a local cluster takes seconds to start, a worker seconds to import torch); returns the
        dataset the checks loaded. A bad config or store is the error shown, even when the cluster failed too."""
        check_address(cluster_address(self.cfg))  # a dead address is one line before anything else starts
        with ThreadPoolExecutor(1) as pool:
            checked = pool.submit(checks)
            try:
                connect_checked(self.cfg)
                self.group = start_group(self.cfg)
                return checked.result()
            except BaseException:
                self.shutdown()
                checked.result()
                raise

    def execute(self, run: RunStorage, dataset: Dataset | None, mlflow_run: tuple[str, str] | None = None,
                on_epoch: Callable[[dict], None] | None = None, show_progress: bool = True) -> Path:
        """Train on the cluster (logging to the MLflow run `(uri, run_id)` when given); returns the folder of the
        last checkpoint. `on_epoch(record)` gets each epoch's metrics as its checkpoint lands (a Tune trial reports
        them); `show_progress` prints what the local executor prints (see Console); `dataset`, the one the driver
        loaded, is shared with the workers."""
        connect(self.cfg)
        resumed = resumed_epochs(run)
        console = Console(self.cfg, run, resumed) if show_progress else None

        def each_epoch(record: dict) -> None:
            if console is not None:
                console.epoch(record)
            if on_epoch is not None:
                on_epoch(record)

        new_epochs = NewEpochs(run, each_epoch, resumed)

        def poll(statuses: list[Status | None]) -> None:
            new_epochs()
            if console is not None:
                console.workers(statuses)

        uri, run_id = mlflow_run or (None, None)
        group, self.group = self.group, None  # the workers started beforehand run the first attempt
        try:
            run_roles(self.cfg, run, train_worker, uri, run_id, poll, dataset, group)
        finally:
            new_epochs()  # the epochs saved before a failure ended the wait have their lines too
            if console is not None:
                console.display.close()
        return run.checkpoints().latest()

    def shutdown(self) -> None:
        """The workers started beforehand and not used end here."""
        if self.group is not None:
            self.group.shutdown()
            self.group = None


def connect_checked(cfg: RunConfig) -> None:
    """Join (or start) the Ray cluster now, so a dead or missing one is one line before anything starts."""
    address = cluster_address(cfg)
    try:
        connect(cfg)
    except ConnectionError as err:
        raise PreflightError(f"no Ray cluster at runtime.address={address} ({first_line(err)}); start one (`ray "
                             "start --head`) or unset runtime.address and RAY_ADDRESS to start a local one") from None


def newest_history(run: RunStorage) -> list[dict] | None:
    """The epoch history of the run's newest checkpoint ([] before the first), None while it cannot be read
    (pruned or replaced as it was read, or an object store that did not answer: the next look sees it). The
    run's opened store is reused: the driver polls this every half second."""
    try:
        return run.checkpoints().latest_history()
    except (CheckpointError, OSError):
        return None


def resumed_epochs(run: RunStorage) -> int:
    """The epochs of the checkpoint the workers resume from (0 for none, or none readable)."""
    try:
        resumed = run.newest_good()
    except CheckpointError:
        return 0
    return len(resumed[1]) if resumed else 0


class NewEpochs:
    """Passes each epoch of the newest checkpoint's history to `on_epoch` once, in order. A newer checkpoint than
    the one resumed from (`resumed` epochs) was passed over as damaged: its history is not read until the workers
    have saved that epoch again (its records may be wrong, or more than its epoch holds)."""

    def __init__(self, run: RunStorage, on_epoch: Callable[[dict], None], resumed: int = 0):
        self.run, self.on_epoch, self.seen = run, on_epoch, 0
        found = newest_history(run)
        self.passed_over = found if found and len(found) != resumed else None

    def __call__(self) -> None:
        history = newest_history(self.run) or []
        if history == self.passed_over:
            return
        for record in history[self.seen:]:
            self.on_epoch(record)
        self.seen = max(self.seen, len(history))


class Console:
    """The driver's output for a Ray run, the local executor's: each epoch's line, once, from the record its
    checkpoint holds (the epochs a resumed run starts after were shown by the start that ran them), and in
    between what the workers are doing (`group_status` of their statuses) on a `ProgressDisplay`."""

    def __init__(self, cfg: RunConfig, run: RunStorage, resumed: int | None = None):
        self.display, self.line = ProgressDisplay(cfg.runtime.progress_every_s), progress_line(cfg.optim.epochs)
        # the epochs of the checkpoint the workers resume from have their lines
        self.shown = resumed_epochs(run) if resumed is None else resumed
        self.last: Status | None = None

    def epoch(self, record: dict) -> None:
        if record["epoch"] <= self.shown:
            return
        self.display.close()
        self.line(record)
        self.shown = int(record["epoch"])

    def workers(self, statuses: list[Status | None]) -> None:
        """Shows the group's status unless it is the one shown last or of an epoch that has its line."""
        status = group_status(statuses)
        if status is None or status.epoch <= self.shown or status == self.last:
            return
        self.display.show(status)
        self.last = status


class WorkerFailedError(UserError, RuntimeError):
    """A role's worker kept dying after every restart the run allows, or failed with an unexpected error."""


class ClusterLostError(UserError, RuntimeError):
    """The Ray cluster a run joined went away mid-run (its head stopped answering)."""


def worker_user_error(err: Exception) -> UserError | None:
    """The UserError (a NaN loss, a bad checkpoint, a bad config) a Ray task or actor raised, from the error Ray
    raised for it; None when it raised none."""
    cause = err
    while cause is not None:
        inner = getattr(cause, "cause", None)  # a RayTaskError carries the worker's own exception
        if isinstance(cause, UserError) and inner is None:
            return cause
        cause = inner or cause.__cause__
    return None


def explain_failure(err: Exception, run: RunStorage) -> UserError:
    """The one-line error a user can act on: the worker's own UserError if it raised one, else the worker's last
    line and how to resume."""
    own = worker_user_error(err) or disk_full(err, run.where())
    if own is not None:
        return own
    text = str(getattr(err, "cause", None) or err).strip()
    first = text.splitlines()[-1][:300] if text else type(err).__name__
    return WorkerFailedError(f"the run failed in a worker ({first}); checkpoints are kept in "
                             f"{run.where()}: run the same command to resume")
