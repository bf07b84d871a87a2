"""Data-parallel replicas of every role: the mesh of roles x replicas and what keeps the replicas one run.

With `runtime.replicas: R` every role runs R replicas. Each step's global batch (drawn exactly as with one
replica) is split into R shards; replica r of every role works on shard r and exchanges outputs with the other
roles of replica r only, and each trainable role's gradients are summed across its R replicas, each weighted by
its shard's share of the batch: the update of a loss that is a mean over the batch, as one process computes it on
the whole batch. `runtime.placement` puts a replica's roles in one process each (`apart`: P = roles processes per
replica) or all in one (`together`: P = 1). Rank r * P + p is process p of replica r.

BatchNorm normalises each shard by its own statistics unless `runtime.sync_bn` (then by the global batch's, as
one process would: torch's SyncBatchNorm on GPUs, `ReplicaBatchNorm` below on CPUs, where SyncBatchNorm does
not run); the running statistics are averaged across replicas after every epoch either way, so every replica
holds the same weights and buffers and replica 0's checkpoint is the run's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ray_kd.config import RunConfig


@dataclass
class Mesh:
    """Where one process sits in the mesh, and the process groups it talks through."""

    replicas: int
    replica: int
    processes: int  # per replica: the number of roles (apart) or 1 (together)
    roles: list[int]  # the role indices this process runs
    exchange_group: object = None  # the processes of this replica (None: the world, when R = 1)
    role_groups: dict[int, object] = field(default_factory=dict)  # role index -> its replicas' processes
    share: float = 1.0  # this step's shard's share of the global batch
    reduce_s: dict[int, float] = field(default_factory=dict)  # role -> seconds in its gradient all-reduce

    @property
    def lead(self) -> bool:
        """Replica 0 scores, keeps the best students and writes checkpoints for its roles."""
        return self.replica == 0

    def shard(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This replica's part of a global batch of `batch` samples (as even as it allows; `torch.tensor_split`'s
        shards), its share noted. A batch already read as this replica's shard (stream mode) is kept."""
        if self.replicas > 1 and len(y) == batch:
            x, y = torch.tensor_split(x, self.replicas)[self.replica], torch.tensor_split(y, self.replicas)[self.replica]
        self.share = len(y) / batch
        return x, y

    def reduce_gradients(self, role: int, params: list[torch.Tensor]) -> None:
        """Sum the replicas' gradients, each weighted by its shard's share: the global batch's gradient."""
        if self.replicas == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        start = time.perf_counter()
        flat = torch.cat([g.reshape(-1) for g in grads]).mul_(self.share)  # one collective per step
        dist.all_reduce(flat, group=self.role_groups[role])
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        self.reduce_s[role] = self.reduce_s.get(role, 0.0) + time.perf_counter() - start

    def average_buffers(self, role: int, module: nn.Module) -> None:
        """BatchNorm running statistics averaged across the role's replicas (float buffers only)."""
        if self.replicas == 1:
            return
        for buffer in module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer, group=self.role_groups[role])
                buffer.div_(self.replicas)


def processes_per_replica(cfg: RunConfig, roles: int) -> int:
    return roles if cfg.runtime.placement == "apart" else 1


def world_size(cfg: RunConfig, roles: int) -> int:
    return cfg.runtime.replicas * processes_per_replica(cfg, roles)


def build_mesh(cfg: RunConfig, rank: int, roles: int) -> Mesh:
    """This rank's place, and every sub-group of the mesh (created by every rank in the same order, as
    torch.distributed requires). Needs the world process group initialised."""
    replicas, per = cfg.runtime.replicas, processes_per_replica(cfg, roles)
    replica, process = divmod(rank, per)
    local = [process] if per > 1 else list(range(roles))
    mesh = Mesh(replicas, replica, per, local)
    if replicas == 1:
        return mesh
    for r in range(replicas):
        group = dist.new_group([r * per + p for p in range(per)]) if per > 1 else None
        if r == replica:
            mesh.exchange_group = group
    for role in range(roles):
        p = role if per > 1 else 0
        group = dist.new_group([r * per + p for r in range(replicas)])
        if role in local:
            mesh.role_groups[role] = group
    return mesh


class ReplicaBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d over the global batch of a role's replicas on any device (SyncBatchNorm needs a GPU): the
    shards' statistics are summed with a differentiable all_reduce, in two passes (mean, then variance) like a
    one-process BatchNorm, so the numbers match it to float rounding. In eval mode it is a plain BatchNorm2d."""

    def __init__(self, bn: nn.BatchNorm2d, group):
        """Takes over `bn`'s parameters and buffers themselves: an optimiser built over them keeps working."""
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.weight, self.bias = bn.weight, bn.bias
        for name, buffer in bn.named_buffers(recurse=False):
            setattr(self, name, buffer)
        self.train(bn.training)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        total = all_reduce(count, group=self.group)
        mean = all_reduce(x.sum((0, 2, 3)), group=self.group) / total
        centred = x - mean[None, :, None, None]
        var = all_reduce((centred * centred).sum((0, 2, 3)), group=self.group) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * (total / (total - 1))
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out


def synchronise_batchnorm(module: nn.Module, group) -> None:
    """Replace, in place, every BatchNorm2d with one over the replicas' global batch: on CUDA torch's
    SyncBatchNorm, elsewhere ReplicaBatchNorm."""
    for name, child in list(module.named_modules()):
        if type(child) is not nn.BatchNorm2d:
            continue
        device = child.running_mean.device if child.running_mean is not None else torch.device("cpu")
        if device.type == "cuda":
            replacement = nn.SyncBatchNorm.convert_sync_batchnorm(child, group)
        else:
            replacement = ReplicaBatchNorm(child, group)
        module.set_submodule(name, replacement)
