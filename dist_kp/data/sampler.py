"""Distributed, aspect-ratio grouped batch sampling whose order is a pure function of
(seed, epoch, rank, world_size), so a resumed run can start at batch k of an epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from dist_kp.data.coco import SampleKey


def aspect_ratio_groups(aspect_ratios: Sequence[float], group_factor: int) -> np.ndarray:
    """Bin id of each image: 2**linspace(-1, 1, 2k+1) edges, as torchvision's reference."""
    ratios = np.asarray(aspect_ratios, np.float64)
    if group_factor == 0:
        return np.zeros(len(ratios), np.int64)
    edges = 2 ** np.linspace(-1, 1, 2 * group_factor + 1)
    return np.searchsorted(edges, ratios, side="right").astype(np.int64)


class BatchSizeError(ValueError):
    """train.batch_size does not fit the training set (the message gives the numbers)."""


class GroupedDistributedBatchSampler(torch.utils.data.Sampler[list[SampleKey]]):
    """Each rank takes its shard of a seeded permutation (perm[rank::world_size]) and batches it
    so that a batch holds images of one aspect-ratio group.

    Every rank yields ceil(ceil(N / world_size) / batch_size) batches in every epoch. Full
    group batches come first, in the order they fill up; the groups' leftovers then fill the
    last batches, ordered by group (so at most one batch per group boundary mixes groups),
    topped up with the rank's first samples. `len()` is exactly what iteration yields from
    the start batch set by `set_epoch`. A batch may not be larger than a rank's share
    (ceil(N / world_size)): it would be made of repeats of that share.
    """

    def __init__(
        self, aspect_ratios: Sequence[float], batch_size: int, num_replicas: int = 1, rank: int = 0,
        seed: int = 0, group_factor: int = 3,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        if len(aspect_ratios) < num_replicas:
            raise ValueError(f"{len(aspect_ratios)} samples cannot be sharded over {num_replicas} ranks")
        share = math.ceil(len(aspect_ratios) / num_replicas)
        if batch_size < 1:
            raise BatchSizeError(f"train.batch_size={batch_size}: must be at least 1")
        if batch_size > share:
            processes = f"{num_replicas} process{'es' if num_replicas > 1 else ''}"
            raise BatchSizeError(f"train.batch_size={batch_size} is larger than one process's share of the training "
                                 f"set ({len(aspect_ratios)} images over {processes}: {share} each); use 1 to {share}")
        self.groups = aspect_ratio_groups(aspect_ratios, group_factor)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0
        self.batches_per_epoch = math.ceil(math.ceil(len(self.groups) / num_replicas) / batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (reshuffles) and the batch to start from (resume mid-epoch)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.epoch = epoch
        self.start_batch = start_batch

    def shard(self, epoch: int) -> np.ndarray:
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.groups), generator=g).numpy()
        return perm[self.rank:: self.num_replicas]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of this rank for an epoch, from batch 0."""
        shard = self.shard(epoch).tolist()
        pending: dict[int, list[int]] = {}
        batches = []
        for idx in shard:
            group = pending.setdefault(int(self.groups[idx]), [])
            group.append(idx)
            if len(group) == self.batch_size:
                batches.append(group.copy())
                group.clear()
        leftovers = [idx for group in sorted(pending) for idx in pending[group]]
        missing = (self.batches_per_epoch - len(batches)) * self.batch_size - len(leftovers)
        leftovers += [shard[i % len(shard)] for i in range(missing)]
        batches += [leftovers[i: i + self.batch_size] for i in range(0, len(leftovers), self.batch_size)]
        return batches

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for batch in self.epoch_batches(self.epoch)[self.start_batch:]:
            yield [SampleKey(i, self.epoch) for i in batch]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


def eval_shard(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Evaluation shard without padding: every sample exactly once over all ranks."""
    return list(range(rank, num_samples, world_size))
