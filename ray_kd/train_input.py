"""What a `Session`'s training steps read: each step's batch, how long the roles waited for it, what it cost to decode.

A feed gives an epoch's batches (`batches(epoch)`) and the training images decoded for them since it was last asked
(`take_decoded()`, None where this process decodes none or reports none). `SeededFeed` draws them in this process
(`seeded_batches`); on Ray, in stream mode, `ray_kd.loader.LoaderFeed` reads them from the replica's loader, which
decoded them once for all its roles.
"""

from __future__ import annotations

import time
from typing import Iterator, Protocol

import torch

from ray_kd.data import BatchChecksum, seeded_batches

Batch = tuple[torch.Tensor, torch.Tensor]

DECODE_SUMS = ("data/images_decoded", "data/decode_cpu_s", "data/images_decoded_per_s")
"""Decoding metrics each decoding process reports for itself: a run's are their sums over its processes."""


class Feed(Protocol):
    def batches(self, epoch: int) -> Iterator[Batch]: ...

    def take_decoded(self):  # -> streaming.DecodeCount | None
        ...


class SeededFeed:
    """The epoch's batches as `seeded_batches` draws them in this process (stream mode: decoded here too)."""

    def __init__(self, dataset, batch_size: int, seed: int, max_steps: int | None, part: tuple[int, int]):
        self.dataset, self.batch_size, self.seed, self.max_steps, self.part = dataset, batch_size, seed, max_steps, part

    def batches(self, epoch: int) -> Iterator[Batch]:
        return seeded_batches(self.dataset, self.batch_size, self.seed, epoch, self.max_steps, self.part)

    def take_decoded(self):
        take = getattr(self.dataset, "take_decoded", None)  # a set in memory decodes nothing per step
        return take() if take is not None else None


class TrainInput:
    """An epoch's batches from a feed, with the time the process waited for each (`input_wait_ms`) and, with
    `data.checksum`, a running crc32 of what it drew."""

    def __init__(self, feed: Feed, checksum: bool):
        self.feed, self.checksummed = feed, checksum
        self.waited, self.checksum = 0.0, None

    def epoch(self, epoch: int) -> Iterator[Batch]:
        self.waited, self.checksum = 0.0, BatchChecksum() if self.checksummed else None
        batches = iter(self.feed.batches(epoch))
        while True:
            started = time.perf_counter()
            try:
                x, y = next(batches)
            except StopIteration:
                return
            self.waited += time.perf_counter() - started
            if self.checksum:
                self.checksum.add(x, y)
            yield x, y

    def role_metrics(self, name: str, steps: int) -> dict[str, float]:
        """A local role's share: its wait per step, and its batches' checksum."""
        metrics = {f"{name}/input_wait_ms": 1000 * self.waited / max(steps, 1)}
        if self.checksum:
            metrics[f"{name}/data_checksum"] = float(self.checksum.value)
        return metrics

    def decode_metrics(self, wall_s: float) -> dict[str, float]:
        """This process's decoding this epoch (`DECODE_SUMS`); {} where it reports none."""
        decoded = self.feed.take_decoded()
        if decoded is None:
            return {}
        return {"data/images_decoded": float(decoded.images), "data/decode_cpu_s": decoded.cpu_s,
                "data/images_decoded_per_s": decoded.images / wall_s}


def decode_summary(merged: dict[str, float]) -> dict[str, float]:
    """What the run's summed decoding metrics mean per trained image: decodes (1.0: each image decoded once) and
    CPU-milliseconds."""
    images, trained = merged.get("data/images_decoded"), merged.get("data/images_trained")
    if not images or not trained:
        return {}
    return {"data/decodes_per_image": images / trained,
            "data/decode_cpu_ms_per_image": 1000 * merged["data/decode_cpu_s"] / images}
