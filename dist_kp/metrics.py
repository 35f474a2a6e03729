"""The run's metrics.jsonl: one JSON record per logged step, written by rank 0."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from dist_kp import storage

log = logging.getLogger(__name__)


class MetricsFile:
    """Records in OUTPUT_DIR/metrics.jsonl.

    Local files get one appended line per record (a kill can at worst cut the last line,
    which is dropped on reading); object stores, which cannot append, get the whole file
    rewritten, each upload replacing the object at once.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.path = storage.url_to_fs(url)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.records: list[dict[str, Any]] = []
        if self.fs.exists(self.path):
            with self.fs.open(self.path, "r") as f:
                for number, line in enumerate(f, 1):
                    try:
                        self.records.append(json.loads(line))
                    except json.JSONDecodeError:
                        log.warning("%s line %d is cut off (the run was killed while writing it); dropped",
                                    url, number)

    def truncate_after(self, step: int) -> None:
        """Forget records past `step` (a resumed run logs those steps again)."""
        self.records = [r for r in self.records if r.get("step", 0) <= step]
        self._rewrite()

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.local:
            self._rewrite()
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _rewrite(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        self.fs.makedirs(self.fs._parent(self.path), exist_ok=True)
        if self.local:
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, self.path)
            return
        with self.fs.open(self.path, "w") as f:
            f.write(text)
