"""Build a KeypointIndex from a COCO JSON byte stream without holding the parsed document.

The reference path (`json.load` + `index_from_coco`) materialises every polygon of every
person as Python objects: ~1 GB for COCO train. Here the stream is cut into ~1 MB slices of
whole array elements, each parsed by orjson and reduced to columns at once, so the peak is the
arrays plus one slice. The arrays equal `index_from_coco`'s for any valid COCO file.

Cutting: a slice ends at a `}` that is followed by `, {` or `]`. A `}` inside a string or a
nested object can look the same; then the slice is not a complete list of objects, orjson
refuses it, and the next candidate is tried. A slice that does parse is exactly a run of
whole elements (a proper prefix of an element never parses as a complete object).

Lightening: most of the bytes and Python objects of an annotation are numbers the index does
not keep as objects: polygon coordinates (never used) and keypoints (kept as floats). Before
orjson sees an annotation slice, each polygon value `"segmentation": [[...], ...]` is replaced
by 0 and each `"keypoints": [...]` value by a marker string, and the keypoint texts are parsed
as numbers at once. Only lists of plain values (no brackets, braces or quotes inside) are
replaced, so each replacement swaps one complete value for another (and a key can only be
matched as a key: inside a string its quotes would be escaped). Unless every record of the
slice comes back with the marker as its keypoints, and the texts are plain numbers, the slice
is parsed as it is.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import orjson

from dist_kp.data.coco import DataError, KeypointIndex, _keypoint_category

SLICE_BYTES = 1 << 20
_ELEMENT_END = re.compile(rb"\}\s*(?:,\s*\{|\])")
_ARRAY_END = re.compile(rb"\}\s*\]")
_SCALAR_END = re.compile(rb"[,}\]]")
_OBJECT_END = re.compile(rb"\}")
_LIST_END = re.compile(rb"\]")
_QUOTE = re.compile(rb'"')
_WHITESPACE = b" \t\r\n"
_POLYGONS = re.compile(rb'"segmentation"\s*:\s*\[\s*\[[^\[\]{}"]*\](?:\s*,\s*\[[^\[\]{}"]*\])*\s*\]')
_KEYPOINT_LIST = re.compile(rb'"keypoints"\s*:\s*\[([^\[\]{}"]*)\]')
_KEYPOINT_MARKER = b'"keypoints":"\\u0000"'


def _objects(raw: bytes) -> list[Any]:
    return orjson.loads(b"[" + raw + b"]")


class _Stream:
    """A window over the byte stream; `pos` is the next unread byte of `buf`."""

    def __init__(self, read: Callable[[], bytes], source: str) -> None:
        self.read = read
        self.source = source
        self.buf = b""
        self.pos = 0
        self.eof = False

    def more(self) -> bool:
        """Append the next block (dropping what was consumed); False at the end of the stream."""
        if self.eof:
            return False
        block = self.read()
        if not block:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + block
        self.pos = 0
        return True

    def peek(self) -> int:
        """The next byte that is not whitespace (the stream's end is an error)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                raise DataError(f"{self.source}: not valid JSON (ends early)")

    def expect(self, char: bytes) -> None:
        if self.peek() != char[0]:
            found = self.buf[self.pos:self.pos + 20]
            raise DataError(f"{self.source}: not valid JSON (expected {char.decode()!r} at {found!r})")
        self.pos += 1

    def value(self, ends: re.Pattern, after: int) -> Any:
        """Parse the value at pos: try each candidate end (a match of `ends`, plus `after` bytes)."""
        start = self.pos
        search = start
        error = None
        while True:
            match = ends.search(self.buf, search)
            if match is None:
                consumed = self.pos
                if not self.more():
                    raise DataError(f"{self.source}: not valid JSON ({error or 'ends early'})")
                start, search = start - consumed, search - consumed
                continue
            end = match.start() + after
            try:
                value = orjson.loads(self.buf[start:end])
            except orjson.JSONDecodeError as failed:
                error = failed
                search = match.start() + 1
                continue
            self.pos = end
            return value

    def object_array(self, key: str, parse: Callable[[bytes], Any] = _objects) -> Iterator[Any]:
        """parse(slice) of runs of the elements of the array at pos, whose elements must be objects.

        `parse` raises orjson.JSONDecodeError when the slice is not a run of whole elements.
        """
        self.expect(b"[")
        if self.peek() == ord("]"):
            self.pos += 1
            return
        if self.peek() != ord("{"):
            raise DataError(f"{self.source}: not a COCO annotation file ('{key}' is not a list of objects)")
        start = search = self.pos
        error = None
        while True:
            separator = _ELEMENT_END.search(self.buf, max(search, start + SLICE_BYTES))
            closing = _ARRAY_END.search(self.buf, search, separator.start() + 1 if separator else len(self.buf))
            match = closing or separator
            if match is None:
                consumed = self.pos
                if not self.more():
                    raise DataError(f"{self.source}: not valid JSON ({error or 'array ends early'})")
                start, search = start - consumed, search - consumed
                continue
            end = match.start() + 1
            try:
                batch = parse(self.buf[start:end])
            except orjson.JSONDecodeError as failed:
                error = failed
                search = end
                continue
            yield batch
            if match.group().endswith(b"]"):
                self.pos = match.end()
                return
            start = search = self.pos = match.end() - 1


def _lighten(raw: bytes) -> tuple[bytes, list[bytes]]:
    """`[raw]` with polygon lists replaced by 0 and keypoint lists by a marker, and the keypoint
    lists' texts in order. Only lists of plain values (no brackets, braces or quotes) are replaced."""
    text = _POLYGONS.sub(b'"segmentation":0', raw)
    parts = _KEYPOINT_LIST.split(text)
    return b"[" + _KEYPOINT_MARKER.join(parts[0::2]) + b"]", parts[1::2]


def _numbers(spans: list[bytes]) -> tuple[np.ndarray, np.ndarray] | None:
    """(values, count per span) of comma-separated number lists; None if a list holds anything else.

    Lists of non-negative integers (COCO's keypoints) are parsed by array operations; others by
    numpy's text parser.
    """
    text = b"/".join(spans).replace(b", ", b",")  # '/' ends a list; like ',' it sorts below '0'
    if not spans or text.translate(None, b"0123456789,/") or b"//" in text or not text[:1].isdigit():
        return _numbers_one_by_one(spans)
    chars = np.frombuffer(text, np.uint8)
    separators = np.flatnonzero(chars < ord("0"))  # ',' and '/'
    starts = np.concatenate([[0], separators + 1])
    lengths = np.concatenate([separators, [len(chars)]]) - starts
    if lengths.min() < 1 or lengths.max() > 15:  # empty, or beyond float64's exact integers
        return _numbers_one_by_one(spans)
    digits = chars.astype(np.float64) - ord("0")
    values = np.zeros(len(starts))
    for k in range(int(lengths.max())):  # Horner's rule over the k-th digit of every number
        live = lengths > k
        values[live] = values[live] * 10 + digits[starts[live] + k]
    span_ends = np.concatenate([np.flatnonzero(chars[separators] == ord("/")), [len(separators)]])
    return values, np.diff(span_ends, prepend=-1)


def _numbers_one_by_one(spans: list[bytes]) -> tuple[np.ndarray, np.ndarray] | None:
    values, counts = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns (instead of raising) on text it cannot read
        for span in spans:
            count = span.count(b",") + 1 if span.strip() else 0
            try:
                parsed = np.fromstring(span, np.float64, sep=",") if count else np.zeros(0)
            except (ValueError, DeprecationWarning):
                return None
            if len(parsed) != count:
                return None
            values.append(parsed)
            counts.append(count)
    return (np.concatenate(values) if values else np.zeros(0)), np.array(counts, np.int64)


def _annotation_slice(raw: bytes) -> tuple[list[Any], np.ndarray | None, np.ndarray | None]:
    """(records, keypoint values, keypoint count per record); values and counts are None when
    the records hold their keypoint lists themselves."""
    text, spans = _lighten(raw)
    records = orjson.loads(text)  # a wrong cut raises here, as it would for the plain slice
    # Every record must have had exactly its own keypoint list replaced, or the slice is parsed as it is.
    if len(spans) == len(records) and all(isinstance(r, dict) and r.get("keypoints") == "\0" for r in records):
        numbers = _numbers(spans)
        if numbers is not None:
            return records, *numbers
    return _objects(raw), None, None


def _int_or_none(value: Any) -> int | None:
    """The id as index_from_coco's dict lookup matches it: ints, and floats holding an int."""
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


class _Columns:
    """Columns of the images and annotations seen so far, in file order."""

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
                int(im["width"]), int(im["height"])  # raises for what index_from_coco refuses
                self.image_ids.append(int(im["id"]))
                self.widths.append(np.array([im["width"]], np.int32))
                self.heights.append(np.array([im["height"]], np.int32))
                self.file_names.append(str(im["file_name"]))
            except (KeyError, TypeError, ValueError) as error:
                raise DataError(f"{self.source}: image record {im!r} lacks a valid {error}") from None

    def add_annotations(self, parsed: tuple[list[Any], np.ndarray | None, np.ndarray | None]) -> None:
        """Columns of a slice: all at once when every record is regular, else one record at a time."""
        batch, values, counts = parsed
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
            pass  # irregular records: the slow path below checks each one as index_from_coco does
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

    def index(self, categories: list[Any]) -> KeypointIndex:
        """The KeypointIndex of everything added, as index_from_coco builds it."""
        meta = _keypoint_category({"categories": categories}, self.source)
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
        if bad.any():  # the first bad annotation in index_from_coco's order
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


def index_from_stream(read: Callable[[], bytes], source: str) -> KeypointIndex:
    """Stream a COCO keypoints JSON (`read()` returns the next block, b"" at the end) into a KeypointIndex."""
    stream = _Stream(read, source)
    columns = _Columns(source)
    seen: dict[str, Any] = {}
    if stream.peek() != ord("{"):
        raise DataError(f"{source}: not a COCO annotation file (top level is not an object)")
    stream.pos += 1
    while stream.peek() != ord("}"):
        key = stream.value(_QUOTE, 1)
        stream.expect(b":")
        if stream.peek() == ord("[") and key in ("images", "annotations", "categories"):
            seen[key] = []
            add = {"images": columns.add_images, "annotations": columns.add_annotations,
                   "categories": seen[key].extend}[key]
            for batch in stream.object_array(key, _annotation_slice if key == "annotations" else _objects):
                add(batch)
        else:
            opening = stream.peek()
            ends = {ord("{"): (_OBJECT_END, 1), ord("["): (_LIST_END, 1)}.get(opening, (_SCALAR_END, 0))
            seen[key] = stream.value(*ends)
        if stream.peek() == ord(","):
            stream.pos += 1
    for key in ("images", "annotations", "categories"):
        if not isinstance(seen.get(key), list):
            raise DataError(f"{source}: not a COCO annotation file (missing list '{key}')")
    return columns.index(seen["categories"])


