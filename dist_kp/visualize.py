"""Pictures of people: boxes, keypoints and the dataset's own skeleton drawn on an image.

Used by `dist_kp.predict` for model outputs; works the same for ground truth (keypoints with
v=0 are not drawn, nor the limbs that touch them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.utils import draw_bounding_boxes, draw_keypoints

# Distinct colours for the people of one picture (cycled when there are more).
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (255, 225, 25), (170, 110, 40)]


def skeleton_connectivity(skeleton: Sequence[Sequence[int]], num_keypoints: int) -> list[tuple[int, int]]:
    """COCO's 1-based skeleton pairs as the 0-based pairs torchvision draws; bad pairs raise ValueError."""
    pairs = []
    for pair in skeleton:
        if len(pair) != 2 or not all(1 <= int(k) <= num_keypoints for k in pair):
            raise ValueError(f"skeleton pair {list(pair)} is not two 1-based keypoint numbers in 1..{num_keypoints}")
        pairs.append((int(pair[0]) - 1, int(pair[1]) - 1))
    return pairs


def draw_people(
    image: torch.Tensor,
    boxes: torch.Tensor,
    keypoints: torch.Tensor,
    skeleton: Sequence[Sequence[int]],
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw each person's box, keypoints and skeleton limbs in a colour of its own.

    image: uint8 [3, H, W]; boxes: [N, 4] x1, y1, x2, y2; keypoints: [N, K, 3] (x, y, v) with
    v > 0 drawn, or [N, K, 2] (all drawn); skeleton: COCO's 1-based keypoint pairs;
    scores: [N], written next to each box when given. Returns a new uint8 [3, H, W] tensor.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 RGB image [3, H, W], got {image.dtype} {list(image.shape)}")
    boxes, keypoints = boxes.detach().cpu().float(), keypoints.detach().cpu().float()
    if len(boxes) == 0:
        return image.clone()
    connectivity = skeleton_connectivity(skeleton, keypoints.shape[1])
    # Line widths grow with the picture so that large photos stay readable.
    width = max(1, round(min(image.shape[1:]) / 160))
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(boxes))]
    labels = None if scores is None else [f"{float(s):.2f}" for s in scores]
    drawn = draw_bounding_boxes(image, boxes, labels=labels, colors=colours, width=width)
    visible = keypoints[..., 2] > 0 if keypoints.shape[-1] == 3 else torch.ones(keypoints.shape[:2], dtype=torch.bool)
    for person, colour in enumerate(colours):
        drawn = draw_keypoints(drawn, keypoints[person:person + 1, :, :2], connectivity=connectivity, colors=colour,
                               radius=width + 1, width=width, visibility=visible[person:person + 1])
    return drawn
