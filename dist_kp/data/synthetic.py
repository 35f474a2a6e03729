"""Generate a synthetic COCO person-keypoints dataset with real JPEG files.

    dist-kp synthetic --out data/synthetic --train 200 --val 40 --seed 0
    (or python -m dist_kp.data.synthetic ...)
    dist-kp synthetic --out data/five --keypoints nose,left_shoulder,right_shoulder,left_hip,right_hip

Each image holds 1-3 drawn people: the 17 COCO keypoints joined by the COCO skeleton
(limbs as thick lines, head as an ellipse) in varied pose, scale, colour and position.
Keypoints outside the frame are unlabeled (0, 0, 0); some are hidden behind a grey block
and labeled v=1. Landscape and portrait images. Same seed, byte-identical output.
--keypoints keeps the named COCO keypoints only, in the order given (the same images): a dataset
of another skeleton to fine-tune a 17-keypoint model on.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dist_kp.cli import as_process

log = logging.getLogger(__name__)

COCO_KEYPOINT_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
]
COCO_SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
    [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]
IMAGE_SIZES = [(160, 120), (192, 144), (120, 160), (144, 192), (160, 160)]


def _person_keypoints(rng: np.random.Generator, height: float) -> np.ndarray:
    """17 (x, y) points of a person of the given height, centred at the origin (feet at +h/2)."""
    h = height
    shoulder_y, hip_y = -0.25 * h, 0.05 * h
    half_shoulder, half_hip = 0.12 * h, 0.08 * h
    head = np.array([0.0, -0.40 * h])
    pts = np.zeros((17, 2))
    # The person faces the camera: their left is the image's right (+x).
    pts[0] = head + [0, 0.02 * h]
    pts[1], pts[2] = head + [0.03 * h, -0.01 * h], head + [-0.03 * h, -0.01 * h]
    pts[3], pts[4] = head + [0.06 * h, 0.0], head + [-0.06 * h, 0.0]
    pts[5], pts[6] = [half_shoulder, shoulder_y], [-half_shoulder, shoulder_y]
    pts[11], pts[12] = [half_hip, hip_y], [-half_hip, hip_y]
    upper_arm, forearm, thigh, shin = 0.17 * h, 0.15 * h, 0.22 * h, 0.22 * h
    for side, (sh, el, wr) in ((1, (5, 7, 9)), (-1, (6, 8, 10))):
        a1 = math.radians(rng.uniform(-30, 120)) * side
        a2 = a1 + math.radians(rng.uniform(-20, 100)) * side
        pts[el] = pts[sh] + upper_arm * np.array([math.sin(a1), math.cos(a1)])
        pts[wr] = pts[el] + forearm * np.array([math.sin(a2), math.cos(a2)])
    for side, (hp, kn, an) in ((1, (11, 13, 15)), (-1, (12, 14, 16))):
        a1 = math.radians(rng.uniform(-10, 40)) * side
        a2 = a1 - math.radians(rng.uniform(0, 50)) * side
        pts[kn] = pts[hp] + thigh * np.array([math.sin(a1), math.cos(a1)])
        pts[an] = pts[kn] + shin * np.array([math.sin(a2), math.cos(a2)])
    return pts


def _draw_image(rng: np.random.Generator, width: int, height: int, num_people: int) -> tuple[Image.Image, list]:
    background = tuple(int(c) for c in rng.integers(0, 90, size=3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    people = []
    for _ in range(num_people):
        person_h = rng.uniform(0.45, 0.95) * height
        centre = np.array([rng.uniform(0.1, 0.9) * width, rng.uniform(0.35, 0.75) * height])
        pts = _person_keypoints(rng, person_h) + centre
        colour = tuple(int(c) for c in rng.integers(120, 256, size=3))
        thickness = max(2, int(person_h * 0.05))
        for a, b in COCO_SKELETON:
            if 1 <= a <= 5 and 1 <= b <= 5:
                continue
            draw.line([tuple(pts[a - 1]), tuple(pts[b - 1])], fill=colour, width=thickness)
        head_r = 0.08 * person_h
        hx, hy = pts[0]
        draw.ellipse([hx - head_r * 0.8, hy - head_r * 1.2, hx + head_r * 0.8, hy + head_r * 0.6], fill=colour)
        eye_colour = tuple(255 - c for c in colour)
        for k in (1, 2):
            ex, ey = pts[k]
            draw.ellipse([ex - 1.5, ey - 1.5, ex + 1.5, ey + 1.5], fill=eye_colour)
        visibility = np.full(17, 2)
        for k in np.flatnonzero(rng.random(17) < 0.08):
            x, y = pts[k]
            block = 0.06 * person_h
            draw.rectangle([x - block, y - block, x + block, y + block], fill=(128, 128, 128))
            visibility[k] = 1
        people.append((pts, visibility, head_r, thickness))
    annotations = []
    for pts, visibility, head_r, thickness in people:
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < width) & (pts[:, 1] >= 0) & (pts[:, 1] < height)
        visibility = np.where(inside, visibility, 0)
        pad = np.array([thickness / 2, thickness / 2])
        lo = np.minimum(pts.min(0) - pad, pts[0] - [head_r, 1.2 * head_r])
        hi = pts.max(0) + pad
        x0, y0 = max(lo[0], 0.0), max(lo[1], 0.0)
        x1, y1 = min(hi[0], width), min(hi[1], height)
        flat = []
        for (x, y), v in zip(pts, visibility):
            flat += [round(float(x), 2), round(float(y), 2), int(v)] if v > 0 else [0, 0, 0]
        bbox = [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
        annotations.append({
            "keypoints": flat,
            "num_keypoints": int((visibility > 0).sum()),
            "bbox": bbox,
            "area": round(bbox[2] * bbox[3] * 0.5, 2),
            "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
            "iscrowd": 0,
        })
    return image, annotations


def _edge_case_annotations(rng: np.random.Generator, width: int, height: int) -> list[dict]:
    """A crowd region, a person without keypoints and a zero-area box (for filter tests)."""
    x, y = float(rng.uniform(0, width / 2)), float(rng.uniform(0, height / 2))
    blank = [0] * 51
    return [
        {"keypoints": blank, "num_keypoints": 0, "bbox": [x, y, 30.0, 40.0], "area": 1200.0,
         "segmentation": {"counts": [height * width], "size": [height, width]}, "iscrowd": 1},
        {"keypoints": blank, "num_keypoints": 0, "bbox": [x, y, 20.0, 25.0], "area": 500.0,
         "segmentation": [[x, y, x + 20, y, x + 20, y + 25]], "iscrowd": 0},
        {"keypoints": blank, "num_keypoints": 0, "bbox": [x, y, 0.0, 10.0], "area": 0.0,
         "segmentation": [[x, y, x, y + 10, x, y]], "iscrowd": 0},
    ]


def select_keypoints(data: dict, names: Sequence[str]) -> dict:
    """A COCO person-keypoints dataset (its JSON) with only the named keypoints, in the order given: each
    annotation's keypoints and num_keypoints, and the skeleton's limbs between two kept keypoints."""
    category = data["categories"][0]
    unknown = [name for name in names if name not in category["keypoints"]]
    if unknown or len(set(names)) != len(names) or not names:
        raise ValueError(f"keypoints to keep {list(names)}: give each once, from {', '.join(category['keypoints'])}"
                         + (f" ({', '.join(unknown)} not among them)" if unknown else ""))
    keep = [category["keypoints"].index(name) for name in names]
    new_number = {old + 1: new + 1 for new, old in enumerate(keep)}
    skeleton = [[new_number[a], new_number[b]] for a, b in category["skeleton"] if a in new_number and b in new_number]
    annotations = []
    for annotation in data["annotations"]:
        flat = annotation["keypoints"]
        kept = [value for k in keep for value in flat[3 * k:3 * k + 3]]
        annotations.append({**annotation, "keypoints": kept, "num_keypoints": sum(1 for v in kept[2::3] if v > 0)})
    return {**data, "annotations": annotations,
            "categories": [{**category, "keypoints": list(names), "skeleton": skeleton}, *data["categories"][1:]]}


def write_split(out: Path, split: str, count: int, rng: np.random.Generator, first_id: int,
                edge_cases: bool, keypoints: Sequence[str] | None = None) -> None:
    image_dir = out / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for n in range(count):
        image_id = first_id + n
        width, height = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
        image, anns = _draw_image(rng, width, height, int(rng.integers(1, 4)))
        if edge_cases and n % 4 == 3:
            anns += _edge_case_annotations(rng, width, height)
        file_name = f"{image_id:012d}.jpg"
        image.save(image_dir / file_name, format="JPEG", quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for ann in anns:
            annotations.append({"id": len(annotations) + first_id * 10 + 1, "image_id": image_id,
                                "category_id": 1, **ann})
    data = {
        "info": {"description": f"dist_kp synthetic person keypoints ({split})"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "supercategory": "person",
                        "keypoints": COCO_KEYPOINT_NAMES, "skeleton": COCO_SKELETON}],
    }
    if keypoints is not None:
        data = select_keypoints(data, keypoints)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "annotations" / f"person_keypoints_{split}2017.json").write_text(json.dumps(data))


def generate(out: str | Path, train: int, val: int, seed: int = 0, edge_cases: bool = False,
             keypoints: Sequence[str] | None = None) -> Path:
    """Write train2017/, val2017/ and annotations/ under `out`; returns the root. keypoints: the COCO keypoints
    to keep, in this order (None: all 17); the images are the same either way."""
    root = Path(out)
    if keypoints is not None:  # refused before anything is written
        select_keypoints({"annotations": [], "categories": [{"keypoints": COCO_KEYPOINT_NAMES, "skeleton": []}]},
                         keypoints)
    write_split(root, "train", train, np.random.default_rng([seed, 0]), first_id=1, edge_cases=edge_cases,
                keypoints=keypoints)
    write_split(root, "val", val, np.random.default_rng([seed, 1]), first_id=1_000_000, edge_cases=edge_cases,
                keypoints=keypoints)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dist-kp synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="dataset root to write (COCO layout)")
    parser.add_argument("--train", type=int, default=200, help="training images (default: %(default)s)")
    parser.add_argument("--val", type=int, default=40, help="validation images (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default: %(default)s)")
    parser.add_argument("--edge-cases", action="store_true",
                        help="add crowd, keypoint-less and zero-area annotations to every 4th image")
    parser.add_argument("--keypoints", type=lambda text: [name.strip() for name in text.split(",")],
                        help="keep only these COCO keypoints, in this order (comma-separated names; default: all 17)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        root = generate(args.out, args.train, args.val, args.seed, args.edge_cases, args.keypoints)
    except ValueError as error:
        parser.error(f"--keypoints: {error}")
    log.info("wrote %d train and %d val images under %s", args.train, args.val, root)
    return 0


if __name__ == "__main__":
    sys.exit(as_process(main))
