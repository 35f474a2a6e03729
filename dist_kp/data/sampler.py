"""Distributed, aspect-ratio grouped batch sampling whose order is a pure function of
(seed, epoch, rank, world_size), so a resumed run can start at batch k of an epoch, or, on
another number of processes, with exactly the samples of the epoch not trained yet.
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


def plan_length(num_samples: int, batch_size: int, num_replicas: int) -> int:
    """Batches every rank yields for `num_samples` samples: ceil(ceil(num_samples / world_size) / batch_size)."""
    return math.ceil(math.ceil(num_samples / num_replicas) / batch_size)


def rank_batches(order: Sequence[int], groups: np.ndarray, batch_size: int, num_replicas: int,
                 rank: int) -> list[list[int]]:
    """One rank's batches of `order` (sample indices, in the order they are drawn): its shard
    order[rank::world_size] batched by aspect-ratio group.

    Full group batches come first, in the order they fill up; the groups' leftovers then fill
    the last batches, ordered by group, topped up with the shard's first samples (the order's,
    when the shard is empty) to `plan_length` batches. Only a rank's last batch holds repeats.
    """
    shard = list(order[rank::num_replicas])
    pending: dict[int, list[int]] = {}
    batches = []
    for idx in shard:
        group = pending.setdefault(int(groups[idx]), [])
        group.append(idx)
        if len(group) == batch_size:
            batches.append(group.copy())
            group.clear()
    leftovers = [idx for group in sorted(pending) for idx in pending[group]]
    missing = (plan_length(len(order), batch_size, num_replicas) - len(batches)) * batch_size - len(leftovers)
    source = shard or list(order)
    leftovers += [source[i % len(source)] for i in range(missing)]
    batches += [leftovers[i: i + batch_size] for i in range(0, len(leftovers), batch_size)]
    return batches


class GroupedDistributedBatchSampler(torch.utils.data.Sampler[list[SampleKey]]):
    """Each rank takes its shard of a seeded permutation (perm[rank::world_size]) and batches it
    so that a batch holds images of one aspect-ratio group (`rank_batches`).

    Every rank yields ceil(ceil(N / world_size) / batch_size) batches in every epoch: the
    rank's last batch is topped up with repeats of its first samples (the documented
    remainder). `len()` is exactly what iteration yields from the start batch set by
    `set_epoch`. A batch may not be larger than a rank's share (ceil(N / world_size)): it
    would be made of repeats of that share.

    Resuming on another number of processes: `set_epoch(epoch, start_batch, earlier)`, where
    `earlier` lists the parts of the epoch already trained as (world size, batches done), in
    order. The samples they consumed follow from (seed, epoch, those world sizes); the epoch
    goes on with the others, in the permutation's order, sharded and grouped the same way.
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
        self.num_samples = len(self.groups)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.batches_per_epoch = plan_length(self.num_samples, batch_size, num_replicas)
        self.set_epoch(0)

    def set_epoch(self, epoch: int, start_batch: int = 0, earlier: Sequence[Sequence[int]] = ()) -> None:
        """Select the epoch (reshuffles), the parts of it trained `earlier` on other numbers of
        processes ((world size, batches) each) and the batch of the rest to start from."""
        consumed = self.consumed(epoch, earlier)
        order = self.permutation(epoch)
        self.remaining = order[~np.isin(order, list(consumed))] if consumed else order
        self.batches_this_epoch = plan_length(len(self.remaining), self.batch_size, self.num_replicas)
        if not 0 <= start_batch <= self.batches_this_epoch:
            raise ValueError(f"start batch {start_batch} outside [0, {self.batches_this_epoch}]")
        self.epoch = epoch
        self.start_batch = start_batch
        self.consumed_before = len(consumed)

    def continue_epoch(self, epoch: int, batch: int, earlier: Sequence[Sequence[int]],
                       saved_world_size: int) -> tuple[int, list[list[int]]]:
        """Select a resumed epoch; returns where it continues: (batch, earlier) on this world size.

        A position saved by another number of processes mid-epoch becomes one more earlier part
        (its world size, its batches): this world size continues with the samples it left.
        """
        parts = [[int(world_size), int(batches)] for world_size, batches in earlier]
        if saved_world_size != self.num_replicas and batch:
            parts.append([saved_world_size, batch])
            batch = 0
        self.set_epoch(epoch, start_batch=batch, earlier=parts)
        return batch, parts

    def permutation(self, epoch: int) -> np.ndarray:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g).numpy()

    def shard(self, epoch: int) -> np.ndarray:
        return self.permutation(epoch)[self.rank:: self.num_replicas]

    def consumed(self, epoch: int, earlier: Sequence[Sequence[int]]) -> set[int]:
        """The samples of `epoch` that its `earlier` parts ((world size, batches done) each) trained."""
        order, done = self.permutation(epoch), set()
        for world_size, batches in earlier:
            remaining = [i for i in order.tolist() if i not in done]
            if not 0 <= batches <= plan_length(len(remaining), self.batch_size, world_size):
                raise ValueError(f"epoch {epoch}: {batches} batches on {world_size} processes is past that part")
            for rank in range(world_size):
                for batch in rank_batches(remaining, self.groups, self.batch_size, world_size, rank)[:batches]:
                    done.update(batch)
        return done

    def samples_done(self, batches: int) -> int:
        """Samples of the epoch trained once this rank has done `batches` batches of the epoch's rest
        (the whole epoch after its last batch: the remainder's repeats are not counted)."""
        if batches >= self.batches_this_epoch:
            return self.num_samples
        return self.consumed_before + batches * self.batch_size * self.num_replicas

    def __iter__(self) -> Iterator[list[SampleKey]]:
        batches = rank_batches(self.remaining.tolist(), self.groups, self.batch_size, self.num_replicas, self.rank)
        for batch in batches[self.start_batch:]:
            yield [SampleKey(i, self.epoch) for i in batch]

    def __len__(self) -> int:
        return self.batches_this_epoch - self.start_batch


def eval_shard(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Evaluation shard without padding: every sample exactly once over all ranks."""
    return list(range(rank, num_samples, world_size))
