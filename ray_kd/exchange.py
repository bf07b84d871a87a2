"""How roles see each other's published outputs every step.

`LocalExchange` is for one process running every role; `CollectiveExchange`
runs an all_gather in the worker group's torch.distributed process group
(gloo on CPU, NCCL on GPU). Methods never see which one carried the tensors.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ray_kd.methods import Outputs


class LocalExchange:
    """All roles live here already: the published dicts pass through untouched."""

    def __init__(self):
        self.seconds = 0.0

    def all_gather(self, mine: dict[str, Outputs]) -> dict[str, Outputs]:
        return mine

    def gather_objects(self, obj) -> list:
        return [obj]


class CollectiveExchange:
    """One all_gather per step of every role's outputs, flattened into a single float buffer.

    Roles publish different keys and shapes, so each rank's layout (names and
    shapes) is exchanged once per batch size and cached; after that a step costs
    one collective of max(length) floats per rank.
    """

    def __init__(self, role_names: list[str], rank: int):
        self.role_names, self.rank = role_names, rank
        self._layouts: dict[int, list[list[tuple[str, tuple[int, ...]]]]] = {}
        self.seconds = 0.0

    def all_gather(self, mine: dict[str, Outputs]) -> dict[str, Outputs]:
        start = time.perf_counter()
        (outputs,) = mine.values()
        names = sorted(outputs)
        flat = torch.cat([outputs[n].reshape(-1).float() for n in names])
        key = next(iter(outputs.values())).shape[0]  # the batch size: the same on every rank this step
        if key not in self._layouts:
            layout = [(n, tuple(outputs[n].shape)) for n in names]
            self._layouts[key] = self.gather_objects(layout)
        layouts = self._layouts[key]
        length = max(sum(_numel(s) for _, s in lay) for lay in layouts)
        buffer = torch.zeros(length, dtype=flat.dtype, device=flat.device)
        buffer[:flat.numel()] = flat
        gathered = [torch.empty_like(buffer) for _ in layouts]
        dist.all_gather(gathered, buffer)
        result = {name: _unflatten(buf, lay) for name, buf, lay in zip(self.role_names, gathered, layouts)}
        self.seconds += time.perf_counter() - start
        return result

    def gather_objects(self, obj) -> list:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
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
