"""The run's metrics.jsonl: one JSON record per logged step, written by rank 0."""

from __future__ import annotations

import json
import logging
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
        self.local = storage.is_local(self.fs)
        self.records: list[dict[str, Any]] = []
        with storage.named_errors(url):
            lines = self.fs.cat_file(self.path).decode().splitlines() if self.fs.exists(self.path) else []
        for number, line in enumerate(lines, 1):
            try:
                self.records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is cut off (the run was killed while writing it); dropped", url, number)

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
        with storage.named_errors(self.url):
            storage.write_file(self.fs, self.path, text.encode())
