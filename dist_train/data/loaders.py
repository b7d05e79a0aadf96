"""DataLoaders: the class-balanced sampler, seeded shuffles, workers started safely (workers.py), and their clean-up."""

from __future__ import annotations

import atexit
import multiprocessing
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from dist_train.config import DataConfig
from dist_train.data.datasets import EncodedImageDataset, ImageDataset
from dist_train.data.decode import (
    collate_encoded,
)
from dist_train.data.shards import ShardWindowSampler
from dist_train.data.workers import loader_worker_init, worker_context


class ClassBalancedSampler(Sampler[int]):
    """Draws len(targets) indices per epoch with replacement, each class equally likely.

    The draw is a function of (seed, epoch) only, so every process draws the same sequence and the
    distributed loader's batch sharding splits it without overlap.
    """

    def __init__(self, targets, seed: int):
        targets = np.asarray(targets)
        counts = np.bincount(targets)
        self.weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.double)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator).tolist()


def _kill_loader_workers() -> None:
    """At exit, before multiprocessing's own handler: that one ends daemonic children with SIGTERM, which
    loader workers ignore (loader_worker_init), and then joins them, forever when a failure left a loader
    running. Registered after multiprocessing's handler, so it runs first."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kill as a worker crash
        for child in children:
            child.kill()


def build_loader(dataset: ImageDataset, cfg: DataConfig, train: bool, seed: int) -> DataLoader:
    """A loader for one process; `accelerator.prepare` shards it. Training order is seeded."""
    workers = cfg.num_workers
    if workers > 0:
        atexit.unregister(_kill_loader_workers)
        atexit.register(_kill_loader_workers)
    sampler, records = None, getattr(dataset, "records", None)  # (a user's dataset has none)
    if train and cfg.balanced_sampler:
        sampler = ClassBalancedSampler(records.targets, seed)
    elif train and getattr(records, "shards", None) is not None:  # a few shards at a time (data/shards.py)
        sampler = ShardWindowSampler(records.shards.shard_of(records.rows), cfg.shard_window, seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size if train else (cfg.eval_batch_size or cfg.batch_size),
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        persistent_workers=cfg.persistent_workers and workers > 0,
        # A loader-owned generator: creating an iterator never draws from the global RNG.
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=loader_worker_init,
        multiprocessing_context=worker_context(cfg.worker_start, dataset) if workers > 0 else None,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        collate_fn=collate_encoded if isinstance(dataset, EncodedImageDataset) else None,
        drop_last=False,
    )
