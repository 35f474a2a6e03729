"""COCO person-keypoints annotations as compact arrays, and the datasets built on them.

`KeypointIndex` holds one row per image and one row per annotation in numpy arrays (no
pycocotools object graph). Training samples drop crowd annotations, degenerate boxes and
images with too few visible keypoints; evaluation keeps every image.
"""

from __future__ import annotations

import json
import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, read_file

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


class PackedStrings(Sequence[str]):
    """Strings stored as one UTF-8 byte array plus offsets (memory-mappable, no object per string)."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        self.blob = blob  # uint8 [total bytes]
        self.offsets = offsets  # int64 [N+1]

    @classmethod
    def pack(cls, strings: Sequence[str]) -> PackedStrings:
        encoded = [s.encode("utf-8") for s in strings]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = operator.index(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"string {i} out of range for {len(self)}")
        return self.blob[int(self.offsets[i]):int(self.offsets[i + 1])].tobytes().decode("utf-8")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"PackedStrings({len(self)} strings)"


@dataclass
class KeypointIndex:
    """Images and person annotations of one annotation file, as arrays.

    Annotations of image i are rows ann_offsets[i]:ann_offsets[i+1]. Boxes are COCO xywh.
    An index loaded from the cache (dist_kp.data.index_cache) holds read-only memory-mapped
    arrays shared by every process of the node, plus precomputed training positions.
    """

    source: str
    meta: KeypointMeta
    image_ids: np.ndarray  # int64 [I]
    file_names: Sequence[str]  # list[str], or PackedStrings when loaded from the cache
    widths: np.ndarray  # int32 [I]
    heights: np.ndarray  # int32 [I]
    ann_offsets: np.ndarray  # int64 [I+1]
    boxes: np.ndarray  # float64 [A, 4] xywh (float64: evaluation must see the JSON's exact values)
    keypoints: np.ndarray  # float64 [A, K, 3]
    iscrowd: np.ndarray  # uint8 [A]
    areas: np.ndarray  # float64 [A]
    ann_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64 [A]
    trainable: dict[int, np.ndarray] = field(default_factory=dict)  # min_visible_keypoints -> positions
    precomputed_aspect_ratios: np.ndarray | None = None  # float64 [I], from the cache
    cache_path: str | None = None  # the cache entry the arrays are mapped from

    def __len__(self) -> int:
        return len(self.image_ids)

    def __reduce_ex__(self, protocol: Any) -> Any:
        if self.cache_path is None:
            return super().__reduce_ex__(protocol)
        # Workers started by spawn/forkserver map the same files instead of receiving copies.
        return _reopen_cached, (self.cache_path, self.source, tuple(self.trainable))

    def annotation_rows(self, i: int) -> slice:
        return slice(int(self.ann_offsets[i]), int(self.ann_offsets[i + 1]))

    @property
    def aspect_ratios(self) -> np.ndarray:
        if self.precomputed_aspect_ratios is not None:
            return self.precomputed_aspect_ratios
        return self.widths.astype(np.float64) / self.heights.astype(np.float64)


def _reopen_cached(path: str, source: str, trainable: tuple[int, ...]) -> KeypointIndex:
    from dist_kp.data.index_cache import open_entry

    index = open_entry(path, source, trainable)
    if index is None:
        raise DataError(f"index cache entry {path} of {source} is gone or damaged")
    return index


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
    """Positions of images whose training target has at least one box and enough visible keypoints.

    Taken from the cache when it holds them, else computed over all annotations at once with
    build_target's rules (crowd and boxes empty after clamping dropped).
    """
    cached = index.trainable.get(min_visible_keypoints)
    if cached is not None:
        return cached
    counts = np.diff(index.ann_offsets)
    image_of = np.repeat(np.arange(len(index)), counts)
    x, y, w, h = (index.boxes[:, k] for k in range(4))
    width, height = index.widths[image_of], index.heights[image_of]
    usable = (index.iscrowd == 0) & (
        (x + w).clip(0, width) > x.clip(0, width)) & ((y + h).clip(0, height) > y.clip(0, height))
    visible = (index.keypoints[:, :, 2].astype(np.float32) > 0).sum(axis=1)
    boxes_kept = np.bincount(image_of[usable], minlength=len(index))
    visible_kept = np.bincount(image_of[usable], weights=visible[usable], minlength=len(index))
    return np.flatnonzero((boxes_kept > 0) & (visible_kept >= min_visible_keypoints)).astype(np.int64)


def read_image(url: str) -> torch.Tensor:
    """Decode a JPEG/PNG (local path or fsspec URL) to a uint8 RGB tensor [3, H, W].

    A local file is read straight into a tensor; a URL is fetched whole in one request.
    """
    if "://" not in url or url.startswith("file://"):
        data = read_file(url.removeprefix("file://"))
    else:
        fs, path = storage.url_to_fs(url)
        data = torch.frombuffer(bytearray(fs.cat_file(path)), dtype=torch.uint8)
    return decode_image(data, mode=ImageReadMode.RGB)


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


def _rebuild_targets(targets: list[dict[str, np.ndarray]]) -> TargetList:
    return TargetList({key: torch.from_numpy(value) for key, value in target.items()} for target in targets)


class TargetList(list):
    """A batch's targets. From a loader worker they travel inside the message as array bytes:
    as tensors each of the ~6 small tensors per image would get a shared-memory file of its own,
    which made a worker's batches reach the training process about 2x slower (bench/bench_index.py)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_targets, ([{key: value.numpy() for key, value in target.items()} for target in self],)

    def __copy__(self) -> TargetList:
        # pin_memory copies the batch with copy.copy: a shallow copy, not a trip through __reduce__.
        return TargetList(self)


def collate(batch: list[Any]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], int]:
    """Lists of images and targets (sizes differ), plus how many unreadable images were skipped."""
    return [b[0] for b in batch], TargetList(b[1] for b in batch), sum(b[2] for b in batch)
