"""Data loaders for training (grouped, distributed, resumable) and evaluation (unpadded shards)."""

from __future__ import annotations

import logging

import torch

from dist_kp.config import Config
from dist_kp.data.coco import KeypointDataset, collate, min_visible_for_skeleton, training_filter
from dist_kp.data.flip_pairs import FlipPairs, training_flip_pairs
from dist_kp.data.index import KeypointIndex
from dist_kp.data.index_cache import CachedKeypointIndex, cached_index
from dist_kp.data.sampler import GroupedDistributedBatchSampler, eval_shard
from dist_kp.storage import Storage

log = logging.getLogger(__name__)


def join(root: str, path: str) -> str:
    """`path` under `root` unless it is absolute or a URL itself."""
    if path.startswith("/") or "://" in path:
        return path
    return f"{root.rstrip('/')}/{path}"


def _loader_options(cfg: Config, device: torch.device) -> dict:
    workers = cfg.train.workers
    options = {"num_workers": workers, "collate_fn": collate, "pin_memory": device.type == "cuda",
               # Worker seeds come from this generator, not the global RNG that checkpoints restore.
               "generator": torch.Generator().manual_seed(cfg.train.seed)}
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=cfg.data.prefetch_factor)
    return options


def train_index(cfg: Config, storage: Storage) -> CachedKeypointIndex:
    """The training index from the node's cache, with the positions that pass data.min_visible_keypoints."""
    url = join(cfg.data.root, cfg.data.train_annotations)
    minimum = cfg.data.min_visible_keypoints
    if minimum is None:  # follows the skeleton, which only the index knows
        minimum = min_visible_for_skeleton(None, cached_index(url, storage, cfg.data.cache_dir).meta.num_keypoints)
    return cached_index(url, storage, cfg.data.cache_dir, minimum)


def with_skeleton_defaults(cfg: Config, index: KeypointIndex) -> Config:
    """The config with data.min_visible_keypoints resolved for the training index's skeleton.

    What a checkpoint records and a resume compares: a run that set the value and one that left it
    to follow the skeleton are the same run when the numbers agree.
    """
    minimum = min_visible_for_skeleton(cfg.data.min_visible_keypoints, index.meta.num_keypoints)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"min_visible_keypoints": minimum})})


def val_index(cfg: Config, storage: Storage) -> CachedKeypointIndex:
    """The validation index from the node's cache (every image kept)."""
    return cached_index(join(cfg.data.root, cfg.data.val_annotations), storage, cfg.data.cache_dir)


def build_train_loader(
    cfg: Config, index: KeypointIndex, rank: int, world_size: int, device: torch.device, storage: Storage,
    flips: FlipPairs | None = None,
) -> tuple[torch.utils.data.DataLoader, GroupedDistributedBatchSampler]:
    """flips: the pairs the command resolved and logged at start; None resolves them here (training_flip_pairs)."""
    if flips is None:
        flips = training_flip_pairs(cfg.data, index.meta.keypoint_names, index.source)
    minimum = min_visible_for_skeleton(cfg.data.min_visible_keypoints, index.meta.num_keypoints)
    dataset = KeypointDataset(
        index, join(cfg.data.root, cfg.data.train_images), storage, train=True,
        min_visible_keypoints=minimum, hflip_prob=cfg.data.hflip_prob, seed=cfg.train.seed,
        flip_permutation=flips.permutation(index.meta.keypoint_names), decode=cfg.data.decode == "loader",
    )
    if len(dataset) < world_size:
        raise ValueError(
            f"{index.source}: fewer training images than the {world_size} processes after filtering "
            f"({training_filter(index, minimum).describe()})"
        )
    if rank == 0 and len(dataset) < len(index):  # never silent: which rule dropped how many
        keypoints = index.meta.num_keypoints
        origin = "" if cfg.data.min_visible_keypoints is not None else (
            f"; {minimum} follows the {keypoints}-keypoint skeleton (data.min_visible_keypoints=null: "
            f"round(10 * {keypoints} / 17))")
        log.info("%s: training drops %d of %d images: %s%s", index.source, len(index) - len(dataset), len(index),
                 training_filter(index, minimum).reasons(), origin)
    dataset.check_images_present("data.train_images")  # a wrong folder: one error, not a warning per image
    sampler = GroupedDistributedBatchSampler(
        dataset.aspect_ratios, cfg.train.batch_size, num_replicas=world_size, rank=rank,
        seed=cfg.train.seed, group_factor=cfg.data.aspect_ratio_group_factor,
    )
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **_loader_options(cfg, device))
    return loader, sampler


def build_eval_loader(
    cfg: Config, index: KeypointIndex, rank: int, world_size: int, device: torch.device, storage: Storage
) -> torch.utils.data.DataLoader:
    """This rank's images of the validation set, each image on exactly one rank."""
    dataset = KeypointDataset(index, join(cfg.data.root, cfg.data.val_images), storage, train=False)
    count = len(dataset) if cfg.eval.max_images is None else min(cfg.eval.max_images, len(dataset))
    shard = torch.utils.data.Subset(dataset, eval_shard(count, rank, world_size))
    options = _loader_options(cfg, device)
    options["persistent_workers"] = False
    return torch.utils.data.DataLoader(shard, batch_size=cfg.eval.batch_size, shuffle=False, **options)
