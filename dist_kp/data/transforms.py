"""Training augmentation on uint8 images. Random decisions come from (seed, epoch, sample)."""

from __future__ import annotations

import numpy as np
import torch


def sample_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, sample index): workers and resume do not matter."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


def horizontal_flip(
    image: torch.Tensor, target: dict[str, torch.Tensor], flip_permutation: list[int]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mirror the image, its boxes and keypoints; swap left/right keypoints; keep v=0 as (0, 0, 0)."""
    width = image.shape[-1]
    flipped = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    flipped["boxes"] = boxes
    keypoints = target["keypoints"][:, flip_permutation].clone()
    keypoints[..., 0] = width - keypoints[..., 0]
    keypoints[keypoints[..., 2] == 0] = 0
    flipped["keypoints"] = keypoints
    return image.flip(-1), flipped
