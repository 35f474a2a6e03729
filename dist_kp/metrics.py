"""The run's metrics.jsonl: one JSON record per logged step, written by rank 0."""

from __future__ import annotations

import json
from typing import Any

from dist_kp import storage


class MetricsFile:
    """Appends records to OUTPUT_DIR/metrics.jsonl (any fsspec URL; object stores get the whole
    file rewritten on flush, since they cannot append)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.path = storage.url_to_fs(url)
        self.records: list[dict[str, Any]] = []
        if self.fs.exists(self.path):
            with self.fs.open(self.path, "r") as f:
                self.records = [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Forget records past `step` (a resumed run logs those steps again)."""
        kept = [r for r in self.records if r.get("step", 0) <= step]
        if len(kept) != len(self.records):
            self.records = kept
            self.flush()

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.flush()

    def flush(self) -> None:
        self.fs.makedirs(self.fs._parent(self.path), exist_ok=True)
        with self.fs.open(self.path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in self.records))
