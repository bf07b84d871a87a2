"""How roles see each other's published outputs every step.

`LocalExchange` is for one process running every role (of one replica); `CollectiveExchange`
runs an all_gather among one replica's processes in the worker group's torch.distributed process group
(gloo on CPU, NCCL on GPU). Methods never see which one carried the tensors.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ray_kd.methods import Outputs


class LocalExchange:
    """All roles live here already: the published dicts pass through untouched. `distributed`: this process is
    one replica of several (`runtime.placement=together`), so metrics and barriers still gather across them."""

    def __init__(self, distributed: bool = False):
        self.seconds = self.waited = 0.0
        self.slack_s = 0.0  # nobody to wait for
        self.distributed = distributed

    def all_gather(self, mine: dict[str, Outputs]) -> dict[str, Outputs]:
        return mine

    def gather_objects(self, obj) -> list:
        return gather_objects(obj) if self.distributed else [obj]


class CollectiveExchange:
    """One all_gather per step of every role's outputs, flattened into a single float buffer.

    Roles publish different keys and shapes, so each rank's layout (names and
    shapes) is exchanged once per batch size and cached; after that a step costs
    one collective of max(length) + 1 floats per rank. The send and receive buffers
    are allocated once per layout too and reused every step: what a step returns
    are views into them, valid until the next all_gather (methods use them
    within the step).

    The extra float is how long the rank's previous all_gather took. The last
    rank to arrive took only the transfer, so a rank's time minus the smallest
    is how long it waited for the others (`slack_s`, one step late), time a
    worker holding only a frozen role fills with its scoring
    (evaluation.Evaluator.use_wait).
    """

    def __init__(self, role_names: list[str], rank: int, group=None):
        """`rank` within `group`: the processes of one replica (None: the world, with one replica)."""
        self.role_names, self.rank, self.group = role_names, rank, group
        self._layouts: dict[int, list[list[tuple[str, tuple[int, ...]]]]] = {}
        self._buffers: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # (key, device, slot) -> buffers
        self.seconds = 0.0
        self.waited = 0.0  # the sum of slack_s over the epoch's steps: this rank's time waiting on the others
        self.slack_s = 0.0  # how long the previous step's all_gather waited for slower ranks
        self._took = 0.0
        self.depth, self._slot = 1, 0  # all_gathers in flight at most (1: lockstep), the send buffer in use

    def all_gather(self, mine: dict[str, Outputs]) -> dict[str, Outputs]:
        return self.post(mine).wait()

    def post(self, mine: dict[str, Outputs]) -> Posted:
        """Start this step's all_gather and return at once: a frozen teacher posts its outputs `depth - 1` steps
        ahead of the students (`teacher.ahead`), each in a send buffer of its own until its step completes."""
        start = time.perf_counter()
        (outputs,) = mine.values()
        names = sorted(outputs)
        first = outputs[names[0]]
        key = first.shape[0]  # the batch size: the same on every rank this step
        if key not in self._layouts:
            layout = [(n, tuple(outputs[n].shape)) for n in names]
            self._layouts[key] = gather_objects(layout, self.group)
        layouts = self._layouts[key]
        self._slot = (self._slot + 1) % self.depth
        send, received = self._buffers_for((key, first.device, self._slot), layouts, first.device)
        offset = 0
        for n in names:
            numel = outputs[n].numel()
            send[offset:offset + numel].copy_(outputs[n].reshape(-1))
            offset += numel
        send[-1] = self._took
        work = dist.all_gather(received, send, group=self.group, async_op=True)
        return Posted(self, work, received, layouts, time.perf_counter() - start)

    def _buffers_for(self, slot: tuple, layouts, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if slot not in self._buffers:
            length = max(sum(_numel(s) for _, s in lay) for lay in layouts) + 1  # + the last all_gather's time
            self._buffers[slot] = (torch.zeros(length, device=device),  # the tail past mine stays 0
                                   [torch.empty(length, device=device) for _ in layouts])
        return self._buffers[slot]

    def gather_objects(self, obj) -> list:
        """Every process's `obj`, from all replicas (epoch metrics, step metrics, the checkpoint barrier)."""
        return gather_objects(obj)


class Posted:
    """One step's all_gather in flight; `wait()` gives every role's outputs (views into its receive buffers,
    valid until that buffer's slot is posted again)."""

    def __init__(self, exchange: CollectiveExchange, work, received: list[torch.Tensor], layouts, posting_s: float):
        self.exchange, self.work, self.received, self.layouts = exchange, work, received, layouts
        self.posting_s = posting_s

    def done(self) -> bool:
        return self.work.is_completed()

    def wait(self) -> dict[str, Outputs]:
        """Block until every rank has posted this step; the time spent here and posting is the exchange's."""
        ex, start = self.exchange, time.perf_counter()
        self.work.wait()
        took = torch.stack([buf[-1] for buf in self.received]).tolist()
        ex.slack_s = took[ex.rank] - min(took)
        ex.waited += ex.slack_s
        result = {name: _unflatten(buf, lay) for name, buf, lay in zip(ex.role_names, self.received, self.layouts)}
        ex._took = self.posting_s + time.perf_counter() - start
        ex.seconds += ex._took
        return result


def gather_objects(obj, group=None) -> list:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _unflatten(buffer: torch.Tensor, layout: list[tuple[str, tuple[int, ...]]]) -> Outputs:
    out, offset = {}, 0
    for name, shape in layout:
        n = _numel(shape)
        out[name] = buffer[offset:offset + n].view(shape)
        offset += n
    return out
