"""Stream mode on Ray (`data.decode=once`): one loader actor per replica decodes each training step's images once,
for every role of the replica.

Why: with roles placed apart each role's worker would otherwise run its own DataLoader over the same images and
decode them again (KD: twice, DML with 3 peers: three times), though every role draws the same pixels. The loader
runs the replica's `StreamDataset` (its `data.workers` DataLoader processes, the same (seed, epoch, index)
augmentation keys, order and shard), `ray.put`s each step's batch once (uint8, not normalised: a quarter of the
float bytes) and hands the same object reference to every role, which reads it from its node's shared-memory
object store without a copy and normalises it itself. Measured against per-role decoding in
`benchmarks/decode_once.py` (docs/data-and-models.md, "Sizing the loader"): decodes per trained image 1.0, and the
decoding processes' CPU 0.49-0.56x (KD) and 0.31-0.35x (3 peers) of per-role decoding. Why this over the alternatives (not
measured): it runs the very DataLoader code the other paths run, so the pixels stay bit-identical with no second
implementation of the order and per-sample augmentation keys (Ray Data's `streaming_split` would need one); and a
batch crosses to a node once, into its shared memory, where decoding in one role and broadcasting over the collective
would send it to each other role separately and put the decoding on a role's own cores.

Back-pressure: the loader decodes at most `window` steps (`data.prefetch`, plus `teacher.ahead` for a teacher
posting ahead) beyond the slowest of its roles, and drops its reference to a step once every role took it, so a
replica holds a few batches at most. `data.loader_resources` places it: by default beside the replica's first role
(same node: zero-copy reads), with resources such as {CPU: 4, decode_node: 1} on a node that has them, e.g. a
CPU-only node feeding the GPU nodes. Evaluation batches are still read by each role's own process.
"""

from __future__ import annotations

import threading
import warnings
from typing import Iterator

import ray
import torch

from ray_kd.config import DataConfig, RunConfig
from ray_kd.data import epoch_steps, normalize
from ray_kd.replicas import processes_per_replica
from ray_kd.streaming import DecodeCount, load_stream


def decodes_once(data: DataConfig) -> bool:
    """Whether a Ray run's training batches come from loaders (stream mode, `data.decode=once`)."""
    return data.mode == "stream" and data.decode == "once"


@ray.remote
class BatchLoader:
    """Decodes replica `part[0]`'s shard of each step's batch once; its `consumers` roles each `take` every step."""

    def __init__(self, data: dict, seed: int, max_steps: int | None, part: tuple[int, int], consumers: int,
                 window: int):
        cfg = DataConfig.model_validate(data)
        self.dataset = load_stream(cfg)
        self.dataset.raw_training = True
        self.batch_size, self.seed, self.max_steps, self.part = cfg.batch_size, seed, max_steps, tuple(part)
        self.steps = epoch_steps(self.dataset, cfg.batch_size, max_steps)
        self.consumers, self.window = consumers, window
        self.changed = threading.Condition()
        self.epoch: int | None = None  # the epoch being decoded
        self.ready: dict[int, object] = {}  # step -> its batch's reference (or the error decoding it raised)
        self.taken = [0] * consumers  # steps of `epoch` each role took
        self.producer: threading.Thread | None = None
        self.decoded: dict[int, DecodeCount] = {}

    def take(self, epoch: int, step: int, consumer: int) -> list:
        """[the reference to step `step`'s batch of `epoch`] (or [the error decoding it raised]), once decoded."""
        with self.changed:
            if epoch != self.epoch:
                self._start(epoch)
            self.changed.wait_for(lambda: step in self.ready)
            batch = self.ready[step]
            self.taken[consumer] = max(self.taken[consumer], step + 1)
            if min(self.taken) > step:  # every role has it: the roles' references keep it alive now
                del self.ready[step]
            self.changed.notify_all()
            return [batch]

    def decoded_in(self, epoch: int) -> DecodeCount:
        """The images decoded for `epoch` and the CPU-seconds the DataLoader processes spent on them."""
        with self.changed:
            return self.decoded.get(epoch, DecodeCount())

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def _start(self, epoch: int) -> None:
        """Decode `epoch` from now on (a run resumed, or the next epoch began); the previous pass is abandoned."""
        self.epoch, self.ready, self.taken = epoch, {}, [0] * self.consumers
        self.decoded[epoch] = DecodeCount()
        previous = self.producer
        self.producer = threading.Thread(target=self._produce, args=(epoch, previous), daemon=True)
        self.producer.start()

    def _produce(self, epoch: int, previous: threading.Thread | None) -> None:
        if previous is not None:  # one pass at a time through the persistent DataLoader
            previous.join()
        batches = self.dataset.train_batches(self.batch_size, self.seed, epoch, self.max_steps, self.part)
        for step in range(self.steps):
            with self.changed:
                self.changed.wait_for(lambda: self.epoch != epoch or step < min(self.taken) + self.window)
                if self.epoch != epoch:
                    return
            try:
                images, labels = next(batches)
                batch = ray.put((images.numpy(), labels.numpy()))
            except Exception as err:  # an unreadable image (DataError) or worse: the roles raise it, none waits on
                batch = err
            with self.changed:
                count = self.dataset.take_decoded()
                self.decoded[epoch].add(count.images, count.cpu_s)
                if self.epoch == epoch:
                    self.ready[step] = batch
                self.changed.notify_all()
            if isinstance(batch, Exception):
                return


def start_loaders(cfg: RunConfig, group, roles: int) -> list:
    """One `BatchLoader` per replica, each beside its replica's first role (the placement group `group`'s bundle)
    unless `data.loader_resources` asks for resources to place it by."""
    from ray.util.placement_group import placement_group_table
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    per, replicas = processes_per_replica(cfg, roles), cfg.runtime.replicas
    nodes = placement_group_table(group)["bundles_to_node_id"]
    resources = dict(cfg.data.loader_resources)
    cpus = resources.pop("CPU", 0)
    window = cfg.data.prefetch + (cfg.teacher.ahead if cfg.teacher else 0)
    loaders = []
    for replica in range(replicas):
        where = {} if cfg.data.loader_resources else {
            "scheduling_strategy": NodeAffinitySchedulingStrategy(nodes[replica * per], soft=True)}
        loaders.append(BatchLoader.options(num_cpus=cpus, resources=resources, max_concurrency=2 * per + 4, **where)
                       .remote(cfg.data.model_dump(), cfg.seed, cfg.optim.steps_per_epoch, (replica, replicas), per,
                               window))
    return loaders


class LoaderFeed:
    """One role process's side of its replica's loader: each step's batch, normalised here (`train_input.Feed`)."""

    def __init__(self, loader, consumer: int, dataset, batch_size: int, max_steps: int | None):
        """`consumer`: this process's place in its replica; process 0 reports the loader's decoding."""
        self.loader, self.consumer, self.dataset = loader, consumer, dataset
        self.steps = epoch_steps(dataset, batch_size, max_steps)
        self.epoch = None

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.epoch = epoch
        pending = self.loader.take.remote(epoch, 0, self.consumer)
        for step in range(self.steps):
            [batch] = ray.get(pending)
            if step + 1 < self.steps:  # asked for now: it is decoded, or being decoded, while this step trains
                pending = self.loader.take.remote(epoch, step + 1, self.consumer)
            if isinstance(batch, Exception):
                raise batch
            images, labels = ray.get(batch)  # read-only views of the node's object store
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                x = normalize(torch.from_numpy(images), self.dataset.mean, self.dataset.std)
            yield x, torch.from_numpy(labels.copy())

    def take_decoded(self) -> DecodeCount | None:
        if self.consumer != 0 or self.epoch is None:
            return None
        return ray.get(self.loader.decoded_in.remote(self.epoch))

