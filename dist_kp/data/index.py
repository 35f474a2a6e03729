"""COCO person-keypoints annotations as compact arrays: one row per image, one per annotation.

`KeypointIndex` holds them in numpy arrays (no pycocotools object graph). `IndexBuilder` is the one
place that turns COCO records into those arrays: `index_from_coco` feeds it a parsed JSON,
`coco_stream.index_from_stream` the slices of a streamed one, and `load_index` reads a JSON through
a `Storage`.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dist_kp.data.flip_pairs import flip_permutation, infer_flip_pairs
from dist_kp.storage import Storage


class DataError(ValueError):
    """Annotation or image data that cannot be used; the message names the file and record."""


@dataclass
class KeypointMeta:
    """What a keypoint dataset's category says about its skeleton."""

    category_id: int
    keypoint_names: list[str]
    skeleton: list[list[int]]  # 1-based pairs, as in COCO
    flip_pairs: list[list[str]] | None = None  # the pairs training flipped with; None: inferred from the names

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoint_names)

    @property
    def flip_permutation(self) -> list[int]:
        """Index of each keypoint's mirror image: by flip_pairs, else by the pairs inferred from the names."""
        pairs = self.flip_pairs if self.flip_pairs is not None else infer_flip_pairs(self.keypoint_names)[0]
        return flip_permutation(self.keypoint_names, pairs)

    def to_dict(self) -> dict[str, Any]:
        meta = {"category_id": self.category_id, "keypoint_names": self.keypoint_names, "skeleton": self.skeleton}
        return meta if self.flip_pairs is None else {**meta, "flip_pairs": self.flip_pairs}


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


def load_index(url: str, storage: Storage) -> KeypointIndex:
    """Parse an annotation JSON (local path or fsspec URL, read through `storage`) into a KeypointIndex."""
    try:
        with storage.open(url, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {url}") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{url}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise DataError(f"{url}: not a COCO annotation file (top level is {type(data).__name__})")
    return index_from_coco(data, url)
