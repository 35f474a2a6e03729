"""The run's metrics.jsonl: one JSON record per logged step, written by rank 0."""

from __future__ import annotations

import json
import logging
from typing import Any

from dist_kp.run_folder import RunFolder
from dist_kp.storage import is_local, write_file

log = logging.getLogger(__name__)


class MetricsFile:
    """Records in OUTPUT_DIR/metrics.jsonl.

    Local files get one appended line per record (a kill can at worst cut the last line,
    which is dropped on reading); object stores, which cannot append, get the whole file
    rewritten, each upload replacing the object at once.
    """

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder
        self.url = folder.metrics
        self.fs, self.path = folder.storage.url_to_fs(self.url)
        self.local = is_local(self.fs)
        self.records: list[dict[str, Any]] = []
        lines = folder.read_bytes(self.url).decode(errors="replace").splitlines() if folder.exists(self.url) else []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is cut off (the run was killed while writing it); dropped", self.url, number)
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
                log.warning("%s line %d is not a metrics record (a JSON object with an integer step); dropped",
                            self.url, number)
                continue
            self.records.append(record)

    def truncate_after(self, step: int) -> None:
        """Forget records past `step` (a resumed run logs those steps again)."""
        self.records = [r for r in self.records if r.get("step", 0) <= step]
        self._rewrite()

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.local:
            self._rewrite()
            return
        with self.folder.storage.named_errors(self.url), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _rewrite(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        with self.folder.storage.named_errors(self.url):
            write_file(self.fs, self.path, text.encode())
