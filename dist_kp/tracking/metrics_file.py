"""The run's training records: one JSON record per logged step, written by rank 0.

On a local disk they go to OUTPUT_DIR/metrics.jsonl, one appended line each. An object store
cannot append, and re-uploading the whole file at every record sends bytes quadratic in the
length of the run; there the records go into segments OUTPUT_DIR/metrics/part-<n>.jsonl of at
most SEGMENT_RECORDS records. Records are stored when a checkpoint is saved (a run resumed
from it finds every record up to its step), when SEGMENT_RECORDS are waiting, and at the end
of training. Readers see metrics.jsonl and the segments, in order, as one file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from dist_kp.storage import is_local, write_file
from dist_kp.storage.run_folder import RunFolder

log = logging.getLogger(__name__)

# Records per segment object (about 1 KB each in a real run).
SEGMENT_RECORDS = 500


@dataclass
class _Stored:
    """One stored file of records: metrics.jsonl or a segment."""

    url: str
    records: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0


def _lines(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


class MetricsFile:
    """The records of OUTPUT_DIR: `records` holds every one read or appended, in order.

    Locally each record is one appended line (a kill can at worst cut the last line, which is
    dropped on reading). On an object store bytes sent stay within twice the bytes logged: a
    store of waiting records rewrites the last segment only when it is no larger than they
    are, else starts a new segment.
    """

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder
        self.url = folder.metrics
        self.fs, self.path = folder.storage.url_to_fs(self.url)
        self.local = is_local(self.fs)
        self.records: list[dict[str, Any]] = []
        self._stored: list[_Stored] = []
        self._waiting: list[dict[str, Any]] = []
        self._store_at_step: int | None = None
        numbers = [] if self.local else folder.metrics_segment_numbers()
        self._next_segment = numbers[-1] + 1 if numbers else 0
        self._read(([self.url] if folder.exists(self.url) else []) + [folder.metrics_segment(n) for n in numbers])

    def _path(self, url: str) -> str:
        return self.folder.storage.url_to_fs(url)[1]

    def _read(self, urls: list[str]) -> None:
        """Read the stored files, in order, in one call (concurrent requests on an object store)."""
        paths = [self._path(url) for url in urls]
        with self.folder.storage.named_errors(self.folder.url):
            contents = self.fs.cat(paths) if paths else {}
        for url, path in zip(urls, paths):
            data = contents[path]
            stored = _Stored(url, self._parse(url, data), len(data))
            self._stored.append(stored)
            self.records += stored.records

    @staticmethod
    def _parse(url: str, data: bytes) -> list[dict[str, Any]]:
        records = []
        for number, line in enumerate(data.decode(errors="replace").splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is cut off (the run was killed while writing it); dropped", url, number)
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
                log.warning("%s line %d is not a metrics record (a JSON object with an integer step); dropped",
                            url, number)
                continue
            records.append(record)
        return records

    def truncate_after(self, step: int) -> None:
        """Forget records past `step` (a resumed run logs those steps again); rewrites only the files holding them."""
        self.records = [r for r in self.records if r.get("step", 0) <= step]
        self._waiting = [r for r in self._waiting if r.get("step", 0) <= step]
        if self.local:
            self._write(self.url, self.records)
            return
        kept = []
        for stored in self._stored:
            records = [r for r in stored.records if r.get("step", 0) <= step]
            if len(records) == len(stored.records):
                kept.append(stored)
            elif records:
                kept.append(_Stored(stored.url, records, self._write(stored.url, records)))
            else:
                with self.folder.storage.named_errors(stored.url):
                    self.fs.rm_file(self._path(stored.url))
        self._stored = kept

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.local:
            self._waiting.append(record)
            step = record.get("step", 0)
            stored_with_checkpoint = step == self._store_at_step
            if self._store_at_step is not None and step >= self._store_at_step:
                self._store_at_step = None
            if stored_with_checkpoint or len(self._waiting) >= SEGMENT_RECORDS:
                self.flush()
            return
        with self.folder.storage.named_errors(self.url), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint_started(self, step: int) -> None:
        """A checkpoint of `step` is being saved: store the waiting records now, the record of `step` when it comes."""
        self.flush()
        self._store_at_step = None if self.local else step

    def flush(self) -> None:
        """Store the waiting records (object stores; locally every record is stored when it is appended)."""
        if not self._waiting:
            return
        last = self._stored[-1] if self._stored and self._stored[-1].url != self.url else None
        if last and last.size <= len(_lines(self._waiting)) \
                and len(last.records) + len(self._waiting) <= SEGMENT_RECORDS:
            records = last.records + self._waiting
            last.records, last.size = records, self._write(last.url, records)
        else:
            url = self.folder.metrics_segment(self._next_segment)
            self._stored.append(_Stored(url, self._waiting, self._write(url, self._waiting)))
            self._next_segment += 1
        self._waiting = []

    def _write(self, url: str, records: list[dict[str, Any]]) -> int:
        data = _lines(records)
        with self.folder.storage.named_errors(url):
            write_file(self.fs, self._path(url), data)
        return len(data)
