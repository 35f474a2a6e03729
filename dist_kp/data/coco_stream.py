"""Build a KeypointIndex from a COCO JSON byte stream without holding the parsed document.

`json.load` + `index_from_coco` materialises every polygon of every person as Python objects:
~1 GB for COCO train. Here the stream is cut into ~1 MB slices of whole array elements, each
parsed by orjson and handed to the same `index.IndexBuilder` at once, so the peak is the arrays
plus one slice. The index equals `index_from_coco`'s for any valid COCO file.

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

from dist_kp.data.index import DataError, IndexBuilder, KeypointIndex

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


def index_from_stream(read: Callable[[], bytes], source: str) -> KeypointIndex:
    """Stream a COCO keypoints JSON (`read()` returns the next block, b"" at the end) into a KeypointIndex."""
    stream = _Stream(read, source)
    builder = IndexBuilder(source)
    seen: dict[str, Any] = {}
    if stream.peek() != ord("{"):
        raise DataError(f"{source}: not a COCO annotation file (top level is not an object)")
    stream.pos += 1
    while stream.peek() != ord("}"):
        key = stream.value(_QUOTE, 1)
        stream.expect(b":")
        if stream.peek() == ord("[") and key in ("images", "annotations", "categories"):
            seen[key] = []
            add = {"images": builder.add_images, "annotations": lambda parsed: builder.add_annotations(*parsed),
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
    return builder.build(seen["categories"])


