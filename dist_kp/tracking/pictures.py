"""Pictures of people: boxes, keypoints and the dataset's own skeleton drawn on an image.

Used by `dist_kp.predict` for model outputs; works the same for ground truth (keypoints with
v=0 are not drawn, nor the limbs that touch them). `truth_and_prediction` puts the ground truth
of an image next to a prediction, as training's evaluation pictures show them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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


def titled(image: torch.Tensor, title: str) -> torch.Tensor:
    """The image with a white band above it holding `title`, one or more lines (uint8 [3, H + band, W])."""
    from PIL import Image, ImageDraw, ImageFont

    size = max(10, min(image.shape[2] // 12, 24))
    band = (size + 3) * (title.count("\n") + 1) + 4
    canvas = Image.new("RGB", (image.shape[2], image.shape[1] + band), "white")
    canvas.paste(Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()), (0, band))
    ImageDraw.Draw(canvas).multiline_text((3, 2), title, fill="black", font=ImageFont.load_default(size=size),
                                          spacing=3)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()


def tile(images: Sequence[torch.Tensor], columns: int, gap: int = 6) -> torch.Tensor:
    """Images of any sizes laid out row by row on a white canvas, `columns` per row."""
    if not images:
        raise ValueError("tile needs at least one image")
    rows = [list(images[i:i + columns]) for i in range(0, len(images), columns)]
    width = max(max(sum(im.shape[2] for im in row) + gap * (len(row) - 1) for row in rows), 1)
    heights = [max(im.shape[1] for im in row) for row in rows]
    canvas = torch.full((3, sum(heights) + gap * (len(rows) - 1), width), 255, dtype=torch.uint8)
    y = 0
    for row, height in zip(rows, heights):
        x = 0
        for im in row:
            canvas[:, y:y + im.shape[1], x:x + im.shape[2]] = im
            x += im.shape[2] + gap
        y += height + gap
    return canvas


def pad_to(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The image at the top left of a white canvas of at least height x width."""
    canvas = torch.full((3, max(height, image.shape[1]), max(width, image.shape[2])), 255, dtype=torch.uint8)
    canvas[:, :image.shape[1], :image.shape[2]] = image
    return canvas


def truth_and_prediction(
    image: torch.Tensor, truth: dict[str, torch.Tensor], prediction: dict[str, torch.Tensor],
    skeleton: Sequence[Sequence[int]], caption: str = "",
) -> torch.Tensor:
    """Ground truth (left) next to a prediction (right) of one image, each with a title.

    truth and prediction hold `boxes` [N, 4] xyxy and `keypoints` [N, K, 3]; prediction also `scores`.
    """
    left = titled(draw_people(image, truth["boxes"], truth["keypoints"], skeleton),
                  f"{caption}\nground truth: {len(truth['boxes'])}")
    right = titled(draw_people(image, prediction["boxes"], prediction["keypoints"], skeleton,
                               prediction.get("scores")), f"\nprediction: {len(prediction['boxes'])}")
    return tile([left, right], columns=2)


def people_from_results(results: Sequence[dict], num_keypoints: int, min_score: float) -> dict[str, torch.Tensor]:
    """COCO result records (bbox xywh, flat keypoints) of one image as drawable tensors, best first."""
    chosen = sorted((r for r in results if r["score"] >= min_score), key=lambda r: -r["score"])
    boxes = torch.tensor([r["bbox"] for r in chosen], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    keypoints = torch.tensor([r["keypoints"] for r in chosen], dtype=torch.float32).reshape(-1, num_keypoints, 3)
    return {"boxes": boxes, "keypoints": keypoints,
            "scores": torch.tensor([r["score"] for r in chosen], dtype=torch.float32)}
