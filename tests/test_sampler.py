"""GroupedDistributedBatchSampler: sharding, equal lengths, grouping, determinism, resume."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dist_kp.data.sampler import BatchSizeError, GroupedDistributedBatchSampler, aspect_ratio_groups, eval_shard
from tests.conftest import TINY_CONFIG, run_module, tiny_overrides

RATIOS = np.random.default_rng(0).choice([0.75, 1.0, 4 / 3, 0.6, 1.8], size=103).tolist()


def samplers(world_size: int, batch_size: int = 4, seed: int = 5) -> list[GroupedDistributedBatchSampler]:
    return [GroupedDistributedBatchSampler(RATIOS, batch_size, world_size, rank, seed=seed, group_factor=3)
            for rank in range(world_size)]


def indices(batches) -> list[list[int]]:
    return [[key.index for key in batch] for batch in batches]


@pytest.mark.parametrize("world_size, epoch", list(itertools.product([1, 2, 3, 4], [0, 1, 2])))
def test_shards_are_disjoint_and_cover_the_dataset(world_size: int, epoch: int) -> None:
    shards = [set(s.shard(epoch).tolist()) for s in samplers(world_size)]
    assert sum(len(s) for s in shards) == len(RATIOS)
    assert set().union(*shards) == set(range(len(RATIOS)))
    served: set[int] = set()
    for s in samplers(world_size):
        s.set_epoch(epoch)
        served |= {i for b in indices(s) for i in b}
    assert served == set(range(len(RATIOS)))


@pytest.mark.parametrize("world_size, epoch", list(itertools.product([1, 2, 3, 4], [0, 1, 2])))
def test_every_rank_yields_len_batches_and_the_same_count(world_size: int, epoch: int) -> None:
    counts = []
    for s in samplers(world_size):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        assert all(len(b) == s.batch_size for b in batches)
        counts.append(len(batches))
    assert len(set(counts)) == 1


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_batches_are_aspect_grouped(world_size: int) -> None:
    groups = aspect_ratio_groups(RATIOS, 3)
    num_groups = len(set(groups.tolist()))
    for s in samplers(world_size):
        for epoch in range(3):
            s.set_epoch(epoch)
            mixed = [b for b in indices(s) if len({int(groups[i]) for i in b}) > 1]
            # Only the leftover batches at the end of the epoch may span a group boundary.
            assert len(mixed) <= num_groups - 1
            assert all(b in indices(s)[-(num_groups - 1):] for b in mixed)


def test_same_seed_and_epoch_give_the_same_batches_and_epochs_differ() -> None:
    a, b = samplers(2)[1], samplers(2)[1]
    a.set_epoch(3)
    b.set_epoch(3)
    assert indices(a) == indices(b)
    b.set_epoch(4)
    assert indices(a) != indices(b)
    other_seed = samplers(2, seed=6)[1]
    other_seed.set_epoch(3)
    assert indices(a) != indices(other_seed)


def test_keys_carry_the_epoch() -> None:
    s = samplers(1)[0]
    s.set_epoch(7)
    assert {key.epoch for batch in s for key in batch} == {7}


@pytest.mark.parametrize("k", [0, 1, 5, 9])
def test_starting_at_batch_k_yields_the_tail(k: int) -> None:
    full, resumed = samplers(3)[2], samplers(3)[2]
    full.set_epoch(2)
    resumed.set_epoch(2, start_batch=k)
    assert indices(resumed) == indices(full)[k:]
    assert len(resumed) == len(full) - k


def test_start_batch_past_the_epoch_is_refused() -> None:
    s = samplers(2)[0]
    with pytest.raises(ValueError, match="start batch"):
        s.set_epoch(0, start_batch=s.batches_per_epoch + 1)


def test_batch_size_larger_than_a_ranks_share_is_refused_with_the_numbers() -> None:
    with pytest.raises(BatchSizeError, match=r"train\.batch_size=53 is larger than one process's share of the "
                                             r"training set \(103 images over 2 processes: 52 each\); use 1 to 52"):
        GroupedDistributedBatchSampler(RATIOS, 53, num_replicas=2, rank=1)
    with pytest.raises(BatchSizeError, match=r"train\.batch_size=1000000 .*\(103 images over 1 process: 103 each\)"):
        GroupedDistributedBatchSampler(RATIOS, 1_000_000)
    assert issubclass(BatchSizeError, ValueError)
    largest = GroupedDistributedBatchSampler(RATIOS, 52, num_replicas=2, rank=1)
    assert [len(batch) for batch in largest] == [52]


def test_training_with_a_batch_larger_than_the_training_set_stops_at_once_naming_the_key(
        synthetic_root: Path, tmp_path: Path) -> None:
    args = ["--config", str(TINY_CONFIG), *tiny_overrides(synthetic_root, tmp_path / "run", "train.batch_size=100",
                                                          "train.workers=0", "eval.at_end=false", "eval.every_epochs=0")]
    try:
        result = run_module("dist_kp.train", args, timeout=120)
    except subprocess.TimeoutExpired as expired:  # without the check: batches of the 48 images padded with repeats
        pytest.fail(f"dist_kp.train with train.batch_size=100 still running after {expired.timeout} s")
    assert result.returncode != 0
    assert "train.batch_size=100 is larger than one process's share of the training set" in result.stderr, \
        result.stderr[-3000:]


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_eval_shards_cover_each_sample_exactly_once(world_size: int) -> None:
    served = [i for rank in range(world_size) for i in eval_shard(17, rank, world_size)]
    assert sorted(served) == list(range(17))


# Parts of an epoch trained before, as (world size, batches), and the world size that trains the rest.
CONTINUATIONS = [([(2, 3)], 3), ([(4, 1), (1, 5), (3, 1)], 2), ([(3, 0)], 2), ([(1, 25)], 4), ([(2, 13)], 3),
                 ([(2, 5), (2, 3)], 1), ([(8, 3)], 8)]


@pytest.mark.parametrize("earlier, world_size", CONTINUATIONS)
def test_an_epoch_continued_on_other_numbers_of_processes_trains_each_sample_once(earlier, world_size) -> None:
    epoch, served, last_batches, remainder = 2, [], [], 0
    for i, (world, batches) in enumerate([*earlier, (world_size, None)]):
        steps, before = set(), len(set(served))
        for s in samplers(world):
            s.set_epoch(epoch, earlier=earlier[:i])
            assert s.samples_done(0) == before
            rest = indices(s)
            part = rest[:batches]
            steps.add(len(part))
            served += [idx for batch in part for idx in batch]
            if len(part) == len(rest):  # this part ended the epoch: its last batches hold the remainder
                last_batches += rest[-1:]
                assert s.samples_done(len(part)) == len(RATIOS)
        assert len(steps) == 1  # every rank trains the same number of steps
        if len(part) == len(rest):
            remainder += s.batches_this_epoch * world * s.batch_size - len(s.remaining)
    counts = np.bincount(served, minlength=len(RATIOS))
    assert counts.min() == 1  # none dropped
    # Repeats only top up each rank's last batch: the documented remainder.
    assert counts.sum() - len(RATIOS) == remainder
    assert set(np.flatnonzero(counts > 1).tolist()) <= {idx for batch in last_batches for idx in batch}


def test_the_rest_of_an_epoch_resumes_at_batch_k_on_the_same_processes() -> None:
    full, resumed = samplers(3)[1], samplers(3)[1]
    full.set_epoch(1, earlier=[(2, 4)])
    resumed.set_epoch(1, start_batch=2, earlier=[(2, 4)])
    assert indices(resumed) == indices(full)[2:] and len(resumed) == len(full) - 2
    with pytest.raises(ValueError, match="past that part"):
        full.set_epoch(1, earlier=[(2, full.batches_per_epoch + 30)])
