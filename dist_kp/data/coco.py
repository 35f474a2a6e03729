"""COCO person-keypoints annotations as compact arrays, and the datasets built on them.

`KeypointIndex` holds one row per image and one row per annotation in numpy arrays (no
pycocotools object graph). Training samples drop crowd annotations, degenerate boxes and
images with too few visible keypoints; evaluation keeps every image.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from dist_kp import storage
from dist_kp.data.transforms import horizontal_flip, sample_generator

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Annotation or image data that cannot be used; the message names the file and record."""


@dataclass
class KeypointMeta:
    """What a keypoint dataset's category says about its skeleton."""

    category_id: int
    keypoint_names: list[str]
    skeleton: list[list[int]]  # 1-based pairs, as in COCO

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoint_names)

    @property
    def flip_permutation(self) -> list[int]:
        """Index of each keypoint's mirror image: left_x <-> right_x, others map to themselves."""
        position = {name: i for i, name in enumerate(self.keypoint_names)}
        perm = []
        for name in self.keypoint_names:
            if name.startswith("left_"):
                mirror = "right_" + name[len("left_"):]
            elif name.startswith("right_"):
                mirror = "left_" + name[len("right_"):]
            else:
                mirror = name
            perm.append(position.get(mirror, position[name]))
        return perm

    def to_dict(self) -> dict[str, Any]:
        return {"category_id": self.category_id, "keypoint_names": self.keypoint_names, "skeleton": self.skeleton}


@dataclass
class KeypointIndex:
    """Images and person annotations of one annotation file, as arrays.

    Annotations of image i are rows ann_offsets[i]:ann_offsets[i+1]. Boxes are COCO xywh.
    """

    source: str
    meta: KeypointMeta
    image_ids: np.ndarray  # int64 [I]
    file_names: list[str]
    widths: np.ndarray  # int32 [I]
    heights: np.ndarray  # int32 [I]
    ann_offsets: np.ndarray  # int64 [I+1]
    boxes: np.ndarray  # float64 [A, 4] xywh (float64: evaluation must see the JSON's exact values)
    keypoints: np.ndarray  # float64 [A, K, 3]
    iscrowd: np.ndarray  # uint8 [A]
    areas: np.ndarray  # float64 [A]
    ann_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64 [A]

    def __len__(self) -> int:
        return len(self.image_ids)

    def annotation_rows(self, i: int) -> slice:
        return slice(int(self.ann_offsets[i]), int(self.ann_offsets[i + 1]))

    @property
    def aspect_ratios(self) -> np.ndarray:
        return self.widths.astype(np.float64) / self.heights.astype(np.float64)


def _keypoint_category(data: dict[str, Any], source: str) -> KeypointMeta:
    categories = [c for c in data.get("categories", []) if c.get("keypoints")]
    if not categories:
        raise DataError(f"{source}: no category with 'keypoints' (is this a COCO person-keypoints file?)")
    person = next((c for c in categories if c.get("name") == "person"), categories[0])
    return KeypointMeta(int(person["id"]), list(person["keypoints"]), [list(p) for p in person.get("skeleton", [])])


def index_from_coco(data: dict[str, Any], source: str) -> KeypointIndex:
    """Build the arrays from a parsed COCO keypoints JSON; records are checked and named on error."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{source}: not a COCO annotation file (missing list '{key}')")
    meta = _keypoint_category(data, source)
    num_kp = meta.num_keypoints
    images = sorted(data["images"], key=lambda im: im["id"])
    position = {}
    for i, im in enumerate(images):
        try:
            position[int(im["id"])] = i
            int(im["width"]), int(im["height"]), str(im["file_name"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{source}: image record {im!r} lacks a valid {error}") from None
    anns = [a for a in data["annotations"] if a.get("category_id") == meta.category_id]
    anns.sort(key=lambda a: (position.get(a.get("image_id"), -1), a.get("id", 0)))
    counts = np.zeros(len(images), np.int64)
    boxes = np.zeros((len(anns), 4), np.float64)
    keypoints = np.zeros((len(anns), num_kp, 3), np.float64)
    iscrowd = np.zeros(len(anns), np.uint8)
    areas = np.zeros(len(anns), np.float64)
    ann_ids = np.zeros(len(anns), np.int64)
    for j, ann in enumerate(anns):
        where = f"{source}: annotation id={ann.get('id')}"
        if ann.get("image_id") not in position:
            raise DataError(f"{where} refers to image_id={ann.get('image_id')} which is not in 'images'")
        kps = ann.get("keypoints") or [0] * (3 * num_kp)
        if len(kps) != 3 * num_kp:
            raise DataError(f"{where} has {len(kps)} keypoint values, expected {3 * num_kp} ({num_kp} keypoints)")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise DataError(f"{where} has bbox {bbox!r}, expected [x, y, w, h]")
        counts[position[ann["image_id"]]] += 1
        boxes[j] = bbox
        keypoints[j] = np.asarray(kps, np.float64).reshape(num_kp, 3)
        iscrowd[j] = int(ann.get("iscrowd", 0))
        areas[j] = float(ann.get("area", bbox[2] * bbox[3]))
        ann_ids[j] = int(ann.get("id", j))
    offsets = np.zeros(len(images) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return KeypointIndex(
        source=source,
        meta=meta,
        image_ids=np.array([im["id"] for im in images], np.int64),
        file_names=[str(im["file_name"]) for im in images],
        widths=np.array([im["width"] for im in images], np.int32),
        heights=np.array([im["height"] for im in images], np.int32),
        ann_offsets=offsets,
        boxes=boxes,
        keypoints=keypoints,
        iscrowd=iscrowd,
        areas=areas,
        ann_ids=ann_ids,
    )


def load_index(url: str) -> KeypointIndex:
    """Parse an annotation JSON (local path or fsspec URL) into a KeypointIndex."""
    try:
        with storage.open_url(url, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {url}") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{url}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise DataError(f"{url}: not a COCO annotation file (top level is {type(data).__name__})")
    return index_from_coco(data, url)


def build_target(index: KeypointIndex, i: int, train: bool) -> dict[str, torch.Tensor]:
    """Target of image i: boxes xyxy clamped to the image, labels, keypoints [N, K, 3], image_id.

    Training drops crowd annotations and boxes that are empty after clamping.
    """
    rows = index.annotation_rows(i)
    xywh = index.boxes[rows]
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, index.widths[i])
    xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, index.heights[i])
    keep = np.ones(len(xyxy), bool)
    if train:
        keep = (index.iscrowd[rows] == 0) & (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    return {
        "boxes": torch.from_numpy(xyxy[keep].astype(np.float32)).reshape(-1, 4),
        "labels": torch.ones(int(keep.sum()), dtype=torch.int64),
        "keypoints": torch.from_numpy(index.keypoints[rows][keep].astype(np.float32)).reshape(
            -1, index.meta.num_keypoints, 3),
        "image_id": torch.tensor(int(index.image_ids[i])),
        "iscrowd": torch.from_numpy(index.iscrowd[rows][keep].astype(np.int64)),
        "area": torch.from_numpy(index.areas[rows][keep].astype(np.float32)),
    }


def trainable_images(index: KeypointIndex, min_visible_keypoints: int) -> np.ndarray:
    """Positions of images with at least one usable person and enough visible keypoints."""
    keep = []
    for i in range(len(index)):
        target = build_target(index, i, train=True)
        if len(target["boxes"]) == 0:
            continue
        if int((target["keypoints"][..., 2] > 0).sum()) >= min_visible_keypoints:
            keep.append(i)
    return np.asarray(keep, np.int64)


def read_image(url: str) -> torch.Tensor:
    """Decode a JPEG/PNG (local path or fsspec URL) to a uint8 RGB tensor [3, H, W]."""
    with storage.open_url(url, "rb") as f:
        data = f.read()
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


class SampleKey(NamedTuple):
    """What the batch sampler hands the dataset: the sample and the epoch it is drawn in."""

    index: int
    epoch: int


class KeypointDataset(torch.utils.data.Dataset):
    """Images of a KeypointIndex with their targets.

    Training: items are addressed by SampleKey(index, epoch) so that augmentation decisions
    come from (seed, epoch, index), never from a worker's running RNG. Evaluation: by int.
    A training image that cannot be read is replaced by the next readable one and counted
    (batches keep their size, so every rank still runs the same steps).
    """

    def __init__(
        self, index: KeypointIndex, image_root: str, train: bool, min_visible_keypoints: int = 0,
        hflip_prob: float = 0.0, seed: int = 0,
    ) -> None:
        self.index = index
        self.image_root = image_root.rstrip("/")
        self.train = train
        self.positions = trainable_images(index, min_visible_keypoints) if train else np.arange(len(index))
        self.hflip_prob = hflip_prob
        self.seed = seed
        self.flip_permutation = index.meta.flip_permutation

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def aspect_ratios(self) -> np.ndarray:
        return self.index.aspect_ratios[self.positions]

    def image_url(self, item: int) -> str:
        return f"{self.image_root}/{self.index.file_names[self.positions[item]]}"

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """(image uint8 [3, H, W], target, number of unreadable images skipped to get here)."""
        item, epoch = (key.index, key.epoch) if isinstance(key, SampleKey) else (int(key), 0)
        skipped = 0
        while True:
            url = self.image_url(item)
            try:
                image = read_image(url)
                break
            except Exception as error:  # noqa: BLE001 - any unreadable file is skipped and named
                if not self.train:
                    raise DataError(f"cannot read evaluation image {url}: {error}") from error
                log.warning("skipping unreadable training image %s: %s", url, error)
                skipped += 1
                if skipped >= min(len(self), 100):
                    raise DataError(f"{skipped} unreadable images in a row under {self.image_root}") from error
                item = (item + 1) % len(self)
        target = build_target(self.index, int(self.positions[item]), train=self.train)
        if self.train and self.hflip_prob > 0:
            if sample_generator(self.seed, epoch, item).random() < self.hflip_prob:
                image, target = horizontal_flip(image, target, self.flip_permutation)
        return image, target, skipped


def collate(batch: list[Any]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], int]:
    """Lists of images and targets (sizes differ), plus how many unreadable images were skipped."""
    return [b[0] for b in batch], [b[1] for b in batch], sum(b[2] for b in batch)
