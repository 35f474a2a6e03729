"""Bytes sent to an object store for the training records of a run: whole-file rewrite vs segments (issue 13).

    .venv/bin/python bench/bench_metrics_upload.py [--records 1000] [--checkpoint-every 25]

Starts SeaweedFS on 127.0.0.1 and counts, at a TCP proxy in front of it, every byte the client
sends (bodies, headers, listings) while 1,000 records of the trainer's shape are logged, a
checkpoint every 25 records (the reference recipe: a record every 20 steps, a checkpoint every
500). "before" replays the old policy (metrics.jsonl re-uploaded whole at every record),
"after" is MetricsFile's segments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_kp.storage import Storage  # noqa: E402
from dist_kp.storage.run_folder import RunFolder  # noqa: E402
from dist_kp.tracking.metrics_file import MetricsFile  # noqa: E402
from tests.s3_server import start_server  # noqa: E402
from tests.test_metrics_segments import CountingProxy, training_record  # noqa: E402

log = logging.getLogger("bench_metrics_upload")


def whole_file_rewrite(folder: RunFolder, records: int) -> None:
    """The policy before segments: every record re-uploads all records so far."""
    lines = []
    for step in range(1, records + 1):
        lines.append(json.dumps(training_record(step)) + "\n")
        folder.write(folder.metrics, "".join(lines).encode())


def segments(folder: RunFolder, records: int, checkpoint_every: int) -> None:
    metrics = MetricsFile(folder)
    for step in range(1, records + 1):
        if step % checkpoint_every == 0:
            metrics.checkpoint_started(step)
        metrics.append(training_record(step))
    metrics.flush()


def measure(server, name: str, write) -> tuple[int, int, float]:
    """(bytes sent, bytes stored, seconds) of one policy in a fresh bucket."""
    bucket = server.create_bucket(f"bench-{name}")
    proxy = CountingProxy(server.port)
    start = time.perf_counter()
    try:
        write(RunFolder(f"s3://{bucket}/run", Storage({"endpoint_url": proxy.endpoint})))
    finally:
        proxy.close()
    seconds = time.perf_counter() - start
    stored = sum(server.filesystem().du(f"{bucket}/run", total=False).values())
    return proxy.sent, stored, seconds


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp))
        os.environ.update(server.env())
        try:
            before = measure(server, "before", lambda folder: whole_file_rewrite(folder, args.records))
            after = measure(server, "after", lambda folder: segments(folder, args.records, args.checkpoint_every))
        finally:
            server.stop()
    for name, (sent, stored, seconds) in (("before (whole-file rewrite)", before), ("after (segments)", after)):
        log.info("%-28s sent %12d bytes for %9d stored (%6.2fx) in %6.1f s", name, sent, stored, sent / stored,
                 seconds)
    log.info("bytes sent, before / after: %.1fx", before[0] / after[0])


if __name__ == "__main__":
    main()
