"""COCO person-keypoints annotations as compact arrays, and the datasets built on them.

`KeypointIndex` holds one row per image and one row per annotation in numpy arrays (no
pycocotools object graph). `IndexBuilder` is the one place that turns COCO records into those
arrays: `index_from_coco` feeds it a parsed JSON, `coco_stream.index_from_stream` the slices of a
streamed one. Training samples drop crowd annotations, degenerate boxes and images with too few
visible keypoints (`training_filter` counts each reason); evaluation keeps every image.
"""

from __future__ import annotations

import json
import logging
import operator
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2.functional import to_dtype

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
    An index loaded from the cache (dist_kp.data.index_cache.CachedKeypointIndex) holds read-only
    memory-mapped arrays shared by every process of the node, plus precomputed training positions.
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

    def __len__(self) -> int:
        return len(self.image_ids)

    def annotation_rows(self, i: int) -> slice:
        return slice(int(self.ann_offsets[i]), int(self.ann_offsets[i + 1]))

    @property
    def aspect_ratios(self) -> np.ndarray:
        if self.precomputed_aspect_ratios is not None:
            return self.precomputed_aspect_ratios
        return self.widths.astype(np.float64) / self.heights.astype(np.float64)


def keypoint_category(categories: list[Any], source: str) -> KeypointMeta:
    """The skeleton of the 'person' category, else of the first category that has keypoints."""
    categories = [c for c in categories if isinstance(c, dict) and c.get("keypoints")]
    if not categories:
        raise DataError(f"{source}: no category with 'keypoints' (is this a COCO person-keypoints file?)")
    person = next((c for c in categories if c.get("name") == "person"), categories[0])
    return KeypointMeta(int(person["id"]), list(person["keypoints"]), [list(p) for p in person.get("skeleton", [])])


def _int_or_none(value: Any) -> int | None:
    """An id as a dict lookup of int ids matches it: ints, and floats holding an int."""
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


class IndexBuilder:
    """The one builder of a KeypointIndex: columns of the images and annotations added so far, in file order.

    Records come in batches (a slice of a streamed file, or a chunk of a parsed one); a batch of regular
    records is converted by numpy at once, an irregular one record by record, each checked and named.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.image_ids: list[int] = []
        self.widths: list[np.ndarray] = []
        self.heights: list[np.ndarray] = []
        self.file_names: list[str] = []
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in (
            "category", "image_id", "ann_id", "has_id", "boxes", "iscrowd", "areas", "kp_lengths")}
        self.keypoints: list[np.ndarray] = []
        self.problems: dict[int, str] = {}  # annotation row -> error, raised only for keypoint annotations
        self.odd_image_ids: dict[int, Any] = {}  # annotation row -> an image_id that is not an integer
        self.num_annotations = 0

    def add_images(self, batch: list[Any]) -> None:
        try:
            ids = [im["id"] for im in batch]
            if set(map(type, ids)) <= {int}:  # the common case, checked and converted by numpy at once
                widths = np.array([im["width"] for im in batch], np.int32)
                heights = np.array([im["height"] for im in batch], np.int32)
                names = [im["file_name"] for im in batch]
                if set(map(type, names)) <= {str}:
                    self.image_ids += ids
                    self.widths.append(widths)
                    self.heights.append(heights)
                    self.file_names += names
                    return
        except (KeyError, TypeError, ValueError, OverflowError):
            pass  # the slow path below names the record
        for im in batch:
            try:
                int(im["width"]), int(im["height"])  # the numpy path accepts what int() accepts
                self.image_ids.append(int(im["id"]))
                self.widths.append(np.array([im["width"]], np.int32))
                self.heights.append(np.array([im["height"]], np.int32))
                self.file_names.append(str(im["file_name"]))
            except (KeyError, TypeError, ValueError) as error:
                raise DataError(f"{self.source}: image record {im!r} lacks a valid {error}") from None

    def add_annotations(self, batch: list[Any], values: np.ndarray | None = None,
                        counts: np.ndarray | None = None) -> None:
        """Columns of a batch: all at once when every record is regular, else one record at a time.

        `values` and `counts` are the batch's keypoints already parsed (flat, and how many per record)
        when the records do not hold them.
        """
        try:
            category = [a["category_id"] for a in batch]
            image_id = [a["image_id"] for a in batch]
            ann_id = [a["id"] for a in batch]
            if set(map(type, category)) | set(map(type, image_id)) | set(map(type, ann_id)) <= {int}:
                if values is None:
                    kps = np.array([a["keypoints"] for a in batch], np.float64)
                    if kps.ndim != 2:
                        raise ValueError("keypoint lists of different lengths")
                    values, counts = kps.reshape(-1), np.full(len(batch), kps.shape[1], np.int64)
                columns = {
                    "category": np.array(category, np.float64), "image_id": np.array(image_id, np.int64),
                    "ann_id": np.array(ann_id, np.int64), "has_id": np.ones(len(batch), bool),
                    "boxes": np.array([a["bbox"] for a in batch], np.float64),
                    "iscrowd": np.array([a.get("iscrowd", 0) for a in batch], np.int64).astype(np.uint8),
                    "areas": np.array([a["area"] for a in batch], np.float64),
                }
                if columns["boxes"].shape == (len(batch), 4):
                    columns["kp_lengths"] = counts
                    for name, column in columns.items():
                        self.parts[name].append(column)
                    self.keypoints.append(values)
                    self.num_annotations += len(batch)
                    return
        except (KeyError, TypeError, ValueError, OverflowError):
            pass  # irregular records: the slow path below checks and names each one
        if values is not None:  # give the records their keypoint lists back
            ends = np.cumsum(counts)
            for record, start, end in zip(batch, (ends - counts).tolist(), ends.tolist()):
                record["keypoints"] = values[start:end].tolist()
        self._add_annotations_one_by_one(batch)

    def _add_annotations_one_by_one(self, batch: list[Any]) -> None:
        n = len(batch)
        category = np.full(n, np.nan)
        image_id = np.full(n, -1, np.int64)
        image_ok = np.zeros(n, bool)
        ann_id = np.zeros(n, np.int64)
        has_id = np.zeros(n, bool)
        boxes = np.zeros((n, 4))
        iscrowd = np.zeros(n, np.uint8)
        areas = np.zeros(n)
        kp_lengths = np.zeros(n, np.int64)
        flat: list[Any] = []
        for j, ann in enumerate(batch):
            if not isinstance(ann, dict):
                raise DataError(f"{self.source}: annotation record {ann!r} is not an object")
            row = self.num_annotations + j
            c = ann.get("category_id")
            if isinstance(c, (int, float)):
                category[j] = c
            i = _int_or_none(ann.get("image_id"))
            if i is not None:
                image_id[j], image_ok[j] = i, True
            else:
                self.odd_image_ids[row] = ann.get("image_id")
            where = f"{self.source}: annotation id={ann.get('id')}"
            kps = ann.get("keypoints") or []
            if not isinstance(kps, list):
                self.problems.setdefault(row, f"{where} has keypoints {kps!r}, expected a list")
                kps = ()
            kp_lengths[j] = len(kps)
            flat.extend(kps)
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4:
                self.problems.setdefault(row, f"{where} has bbox {bbox!r}, expected [x, y, w, h]")
                continue
            try:
                boxes[j] = bbox
                iscrowd[j] = int(ann.get("iscrowd", 0))
                areas[j] = float(ann.get("area", bbox[2] * bbox[3]))
                if "id" in ann:
                    ann_id[j], has_id[j] = int(ann["id"]), True
            except (TypeError, ValueError, OverflowError) as error:
                self.problems.setdefault(row, f"{where} has an invalid field ({error})")
        try:
            values = np.asarray(flat, np.float64)
        except (TypeError, ValueError):
            values = self._numeric_keypoints(batch, kp_lengths)
        image_id[~image_ok] = np.iinfo(np.int64).min  # matches no image
        for name, column in (("category", category), ("image_id", image_id), ("ann_id", ann_id),
                             ("has_id", has_id), ("boxes", boxes), ("iscrowd", iscrowd), ("areas", areas),
                             ("kp_lengths", kp_lengths)):
            self.parts[name].append(column)
        self.keypoints.append(values)
        self.num_annotations += n

    def _numeric_keypoints(self, batch: list[dict], lengths: np.ndarray) -> np.ndarray:
        """The batch's keypoint values one annotation at a time, recording the ones that are not numbers."""
        values = []
        for j, ann in enumerate(batch):
            kps = ann.get("keypoints") or []
            try:
                values.append(np.asarray(kps if isinstance(kps, list) else (), np.float64).reshape(-1))
            except (TypeError, ValueError) as error:
                where = f"{self.source}: annotation id={ann.get('id')}"
                self.problems.setdefault(self.num_annotations + j, f"{where} has non-numeric keypoints ({error})")
                values.append(np.zeros(int(lengths[j])))
        return np.concatenate(values) if values else np.zeros(0)

    def build(self, categories: list[Any]) -> KeypointIndex:
        """The KeypointIndex of everything added; the first bad person annotation (in index order) is named."""
        meta = keypoint_category(categories, self.source)
        num_kp = meta.num_keypoints
        ids = np.asarray(self.image_ids, np.int64)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        if len(ids) and np.any(sorted_ids[1:] == sorted_ids[:-1]):
            duplicate = int(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0])
            raise DataError(f"{self.source}: image id {duplicate} appears more than once in 'images'")
        col = {k: np.concatenate(v) if v else np.zeros(0) for k, v in self.parts.items()}
        lengths = col["kp_lengths"].astype(np.int64)
        selected = np.flatnonzero(col["category"] == meta.category_id)
        image_of = col["image_id"].astype(np.int64)[selected]
        slot = np.searchsorted(sorted_ids, image_of).clip(0, max(len(ids) - 1, 0))
        found = (sorted_ids[slot] == image_of) if len(ids) else np.zeros(len(selected), bool)
        position = np.where(found, slot, -1)
        sort_ids = np.where(col["has_id"][selected].astype(bool), col["ann_id"].astype(np.int64)[selected], 0)
        rank = np.lexsort((sort_ids, position))
        rows = selected[rank]
        position = position[rank]
        bad = (position < 0) | ((lengths[rows] != 0) & (lengths[rows] != 3 * num_kp))
        if self.problems:
            bad |= np.isin(rows, np.fromiter(self.problems, np.int64))
        if bad.any():  # the first bad annotation in index order
            j = int(np.argmax(bad))
            self._raise_for(int(rows[j]), int(position[j]), int(lengths[rows[j]]), num_kp, col)
        keypoints = np.zeros((len(rows), num_kp, 3))
        destination = np.full(self.num_annotations, -1, np.int64)
        destination[rows] = np.arange(len(rows))
        first = 0
        for b, counts in enumerate(self.parts["kp_lengths"]):  # slice by slice: no big temporaries
            values, self.keypoints[b] = self.keypoints[b], None
            where = destination[first:first + len(counts)]
            take = (where >= 0) & (counts > 0)
            if take.any():
                starts = np.cumsum(counts) - counts
                gather = starts[take][:, None] + np.arange(3 * num_kp)[None, :]
                keypoints[where[take]] = values[gather].reshape(-1, num_kp, 3)
            first += len(counts)
        ann_ids = np.where(col["has_id"][rows].astype(bool), col["ann_id"].astype(np.int64)[rows],
                           np.arange(len(rows)))
        counts = np.bincount(position, minlength=len(ids)) if len(rows) else np.zeros(len(ids), np.int64)
        offsets = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        return KeypointIndex(
            source=self.source,
            meta=meta,
            image_ids=sorted_ids,
            file_names=[self.file_names[i] for i in order.tolist()],
            widths=np.concatenate(self.widths)[order] if len(ids) else np.zeros(0, np.int32),
            heights=np.concatenate(self.heights)[order] if len(ids) else np.zeros(0, np.int32),
            ann_offsets=offsets,
            boxes=col["boxes"].reshape(-1, 4)[rows],
            keypoints=keypoints,
            iscrowd=col["iscrowd"].astype(np.uint8)[rows],
            areas=col["areas"].astype(np.float64)[rows],
            ann_ids=ann_ids.astype(np.int64),
        )

    def _raise_for(self, row: int, position: int, length: int, num_kp: int, col: dict[str, np.ndarray]) -> None:
        ann_id = int(col["ann_id"][row]) if col["has_id"][row] else None
        where = f"{self.source}: annotation id={ann_id}"
        if position < 0:
            image_id = self.odd_image_ids.get(row, col["image_id"][row])
            raise DataError(f"{where} refers to image_id={image_id} which is not in 'images'")
        if length not in (0, 3 * num_kp):
            raise DataError(f"{where} has {length} keypoint values, expected {3 * num_kp} ({num_kp} keypoints)")
        raise DataError(self.problems[row])


RECORDS_PER_BATCH = 4096  # a parsed file goes to the builder in batches, as a streamed one does


def index_from_coco(data: dict[str, Any], source: str) -> KeypointIndex:
    """Build the arrays from a parsed COCO keypoints JSON; records are checked and named on error."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{source}: not a COCO annotation file (missing list '{key}')")
    builder = IndexBuilder(source)
    for records, add in ((data["images"], builder.add_images), (data["annotations"], builder.add_annotations)):
        for start in range(0, len(records), RECORDS_PER_BATCH):
            add(records[start:start + RECORDS_PER_BATCH])
    return builder.build(data["categories"])


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


@dataclass(frozen=True)
class TrainingFilter:
    """The images training keeps, and how many it drops for each reason.

    A dropped image is counted once, for the first reason that applies: no person annotation,
    only crowd annotations, only boxes that are empty once clamped to the image, fewer visible
    keypoints (on its usable boxes) than min_visible_keypoints.
    """

    positions: np.ndarray  # int64 positions of the kept images
    images: int
    min_visible_keypoints: int
    without_annotations: int
    only_crowd: int
    only_empty_boxes: int
    too_few_keypoints: int

    def describe(self) -> str:
        return (f"{len(self.positions)} of {self.images} images kept; dropped: {self.without_annotations} without "
                f"person annotations, {self.only_crowd} with only crowd annotations, {self.only_empty_boxes} whose "
                f"boxes are all empty inside the image, {self.too_few_keypoints} with fewer than "
                f"{self.min_visible_keypoints} visible keypoints (data.min_visible_keypoints)")


def training_filter(index: KeypointIndex, min_visible_keypoints: int) -> TrainingFilter:
    """build_target's training rules (crowd and boxes empty after clamping dropped) over all annotations at once."""
    image_of = np.repeat(np.arange(len(index)), np.diff(index.ann_offsets))
    x, y, w, h = (index.boxes[:, k] for k in range(4))
    width, height = index.widths[image_of], index.heights[image_of]
    crowd = index.iscrowd != 0
    usable = ~crowd & ((x + w).clip(0, width) > x.clip(0, width)) & ((y + h).clip(0, height) > y.clip(0, height))
    visible = (index.keypoints[:, :, 2].astype(np.float32) > 0).sum(axis=1)
    annotations = np.bincount(image_of, minlength=len(index))
    not_crowd = np.bincount(image_of[~crowd], minlength=len(index))
    boxes_kept = np.bincount(image_of[usable], minlength=len(index))
    visible_kept = np.bincount(image_of[usable], weights=visible[usable], minlength=len(index))
    few = (boxes_kept > 0) & (visible_kept < min_visible_keypoints)
    return TrainingFilter(
        positions=np.flatnonzero((boxes_kept > 0) & ~few).astype(np.int64),
        images=len(index),
        min_visible_keypoints=min_visible_keypoints,
        without_annotations=int((annotations == 0).sum()),
        only_crowd=int(((annotations > 0) & (not_crowd == 0)).sum()),
        only_empty_boxes=int(((not_crowd > 0) & (boxes_kept == 0)).sum()),
        too_few_keypoints=int(few.sum()),
    )


def trainable_images(index: KeypointIndex, min_visible_keypoints: int) -> np.ndarray:
    """Positions of images whose training target has at least one box and enough visible keypoints.

    Taken from the cache when it holds them, else training_filter(...).positions.
    """
    cached = index.trainable.get(min_visible_keypoints)
    if cached is not None:
        return cached
    return training_filter(index, min_visible_keypoints).positions


def keypoints_outside_images(index: KeypointIndex, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(annotation rows, keypoint numbers) of visible keypoints outside their image, over the images at positions."""
    image_of = np.repeat(np.arange(len(index)), np.diff(index.ann_offsets))
    selected = np.zeros(len(index), bool)
    selected[positions] = True
    x, y, v = (index.keypoints[..., k] for k in range(3))  # views: no copy of the (memory-mapped) array
    width, height = index.widths[image_of][:, None], index.heights[image_of][:, None]
    outside = (v > 0) & ((x < 0) | (x > width) | (y < 0) | (y > height)) & selected[image_of][:, None]
    return np.nonzero(outside)


def leaves_folder(file_name: str) -> bool:
    """Whether an image file name points outside the image folder: absolute, a URL, or climbing out with '..'."""
    return file_name.startswith("/") or "://" in file_name or posixpath.normpath(file_name).split("/")[0] == ".."


def file_names_leaving_folder(names: Sequence[str]) -> list[int]:
    """Positions of the names for which leaves_folder holds."""
    if isinstance(names, PackedStrings):  # one scan of the bytes spares decoding every name of a large index
        lengths = np.diff(names.offsets)
        leading = names.blob[names.offsets[:-1][lengths > 0]]
        text = names.blob.tobytes()
        if b".." not in text and b"://" not in text and not (leading == ord("/")).any():
            return []
    return [i for i, name in enumerate(names) if leaves_folder(name)]


def read_image(url: str) -> torch.Tensor:
    """Decode a JPEG/PNG (local path or fsspec URL) to a uint8 RGB tensor [3, H, W], values 0-255.

    A local file is read straight into a tensor; a URL is fetched whole in one request. 16-bit PNGs
    are scaled to 8 bits; any other sample type is refused naming the file.
    """
    if "://" not in url or url.startswith("file://"):
        data = read_file(url.removeprefix("file://"))
    else:
        fs, path = storage.url_to_fs(url)
        data = torch.frombuffer(bytearray(fs.cat_file(path)), dtype=torch.uint8)
    image = decode_image(data, mode=ImageReadMode.RGB)
    if image.dtype == torch.uint16:
        return to_dtype(image, torch.uint8, scale=True)
    if image.dtype != torch.uint8:
        raise DataError(f"{url}: decodes to {image.dtype} samples, expected 8 or 16 bits per channel")
    return image


class SampleKey(NamedTuple):
    """What the batch sampler hands the dataset: the sample and the epoch it is drawn in."""

    index: int
    epoch: int


class KeypointDataset(torch.utils.data.Dataset):
    """Images of a KeypointIndex with their targets.

    Training: items are addressed by SampleKey(index, epoch) so that augmentation decisions
    come from (seed, epoch, index), never from a worker's running RNG. Evaluation: by int.
    A training image that cannot be read, or whose size differs from its annotation record, is
    replaced by the next good one and counted (batches keep their size, so every rank still runs
    the same steps); an evaluation image of that kind is an error.

    Refused at construction: file names that leave the image folder, and a training set that
    filtering leaves empty (the message counts each reason). Warned about: visible keypoints
    outside their image.
    """

    def __init__(
        self, index: KeypointIndex, image_root: str, train: bool, min_visible_keypoints: int = 0,
        hflip_prob: float = 0.0, seed: int = 0,
    ) -> None:
        self.index = index
        self.image_root = image_root.rstrip("/")
        self.train = train
        self.hflip_prob = hflip_prob
        self.seed = seed
        self.flip_permutation = index.meta.flip_permutation
        leaving = file_names_leaving_folder(index.file_names)
        if leaving:
            named = ", ".join(f"image id={int(index.image_ids[i])} file_name={index.file_names[i]!r}"
                              for i in leaving[:5])
            raise DataError(f"{index.source}: {len(leaving)} image file names leave the image folder "
                            f"{self.image_root}: {named}{', ...' if len(leaving) > 5 else ''}")
        if not train:
            self.positions = np.arange(len(index))
            return
        self.positions = trainable_images(index, min_visible_keypoints)
        if not len(self.positions):
            raise DataError(f"{index.source}: no training images left after filtering "
                            f"({training_filter(index, min_visible_keypoints).describe()})")
        self._warn_keypoints_outside()

    def _warn_keypoints_outside(self) -> None:
        rows, numbers = keypoints_outside_images(self.index, self.positions)
        if not len(rows):
            return
        row, k = int(rows[0]), int(numbers[0])
        i = int(np.searchsorted(self.index.ann_offsets, row, side="right")) - 1
        x, y = self.index.keypoints[row, k, :2]
        log.warning("%s: %d visible keypoints of %d training annotations lie outside their image, e.g. annotation "
                    "id=%d of image id=%d (%dx%d): %s at (%g, %g)", self.index.source, len(rows),
                    len(np.unique(rows)), int(self.index.ann_ids[row]), int(self.index.image_ids[i]),
                    int(self.index.widths[i]), int(self.index.heights[i]), self.index.meta.keypoint_names[k], x, y)

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def aspect_ratios(self) -> np.ndarray:
        return self.index.aspect_ratios[self.positions]

    def image_url(self, item: int) -> str:
        return f"{self.image_root}/{self.index.file_names[self.positions[item]]}"

    def _read(self, item: int) -> torch.Tensor:
        """The decoded image of item, whose size must be the one its annotation record gives."""
        url = self.image_url(item)
        image = read_image(url)
        i = int(self.positions[item])
        width, height = int(self.index.widths[i]), int(self.index.heights[i])
        if image.shape[-2:] != (height, width):
            raise DataError(f"{url} is {image.shape[-1]}x{image.shape[-2]} pixels, but image id="
                            f"{int(self.index.image_ids[i])} of {self.index.source} is {width}x{height}")
        return image

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """(image uint8 [3, H, W], target, number of unusable images skipped to get here)."""
        item, epoch = (key.index, key.epoch) if isinstance(key, SampleKey) else (int(key), 0)
        skipped = 0
        while True:
            try:
                image = self._read(item)
                break
            except Exception as error:  # noqa: BLE001 - any unreadable file is skipped and named
                if not self.train:
                    raise DataError(f"cannot read evaluation image {self.image_url(item)}: {error}") from error
                log.warning("skipping training image %s: %s", self.image_url(item), error)
                skipped += 1
                if skipped >= min(len(self), 100):
                    raise DataError(f"{skipped} unusable images in a row under {self.image_root} "
                                    f"(the last: {error})") from error
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
