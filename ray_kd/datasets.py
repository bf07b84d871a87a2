"""A run's data as `data.mode` says: in memory (`ray_kd.data`) or streamed from disk (`ray_kd.streaming`).

The one place both are imported, so neither imports the other back (streaming builds on data's splits,
ordering and normalisation)."""

from __future__ import annotations

from ray_kd.config import DataConfig
from ray_kd.data import Dataset
from ray_kd.data_sources import load_in_memory
from ray_kd.streaming import StreamDataset, load_stream


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset | StreamDataset:
    """Train/val/test of `cfg.dataset`; val is a fixed stratified share of train (seed 0, not the run seed).

    A `Dataset` in memory, or with `data.mode=stream` a `StreamDataset` reading from disk."""
    return load_stream(cfg) if cfg.mode == "stream" else load_in_memory(cfg)
