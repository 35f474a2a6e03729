"""Training records on an object store: segments, bytes sent proportional to bytes logged, read back as one file."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from dist_kp.tracking.metrics_file import SEGMENT_RECORDS, MetricsFile
from dist_kp.report import load_history
from dist_kp.storage.run_folder import RunFolder, names_a_run_file
from dist_kp.storage import Storage

CHECKPOINT_EVERY = 20


class CountingProxy:
    """A TCP forwarder on 127.0.0.1 to the S3 server, counting every byte clients send through it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sent = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        try:
            while data := source.recv(65536):
                if counted:
                    with self._lock:
                        self.sent += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()


def training_record(step: int) -> dict:
    """The shape of a real record of the trainer (about 0.5 KB)."""
    losses = ("loss", "loss_classifier", "loss_box_reg", "loss_keypoint", "loss_objectness", "loss_rpn_box_reg")
    return {"epoch": step // 100, "batch": step % 100, "step": step, "lr": 0.02 * 0.999 ** step,
            **{f"train/{k}": 1.0 / step + i for i, k in enumerate(losses)},
            **{f"train/{k}_smoothed": 1.5 / step + i for i, k in enumerate(losses)},
            "images_per_s": 123.456789, "data_time_s": 0.0123456, "max_memory_mb": 0.0}


def log_steps(metrics: MetricsFile, steps: range) -> None:
    """What the trainer's hooks do: a checkpoint every CHECKPOINT_EVERY steps (its hook runs before tracking's)."""
    for step in steps:
        if step % CHECKPOINT_EVERY == 0:
            metrics.checkpoint_started(step)
        metrics.append(training_record(step))


@pytest.fixture
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


def stored_objects(server, bucket: str) -> dict[str, int]:
    fs = server.filesystem()
    return {path.split("/run/", 1)[1]: size for path, size in fs.du(f"{bucket}/run", total=False).items()}


def test_200_logged_steps_on_s3_send_at_most_3x_the_final_metrics_size(s3_env) -> None:
    bucket = s3_env.create_bucket("metrics-bytes")
    proxy = CountingProxy(int(s3_env.endpoint.rsplit(":", 1)[1]))
    try:
        metrics = MetricsFile(RunFolder(f"s3://{bucket}/run", Storage({"endpoint_url": proxy.endpoint})))
        log_steps(metrics, range(1, 201))
        metrics.flush()
    finally:
        proxy.close()
    objects = stored_objects(s3_env, bucket)
    final_size = sum(objects.values())
    assert all(names_a_run_file(name) and name.startswith("metrics/part-") for name in objects), objects
    assert final_size > 200 * 400
    # Headers and the listing at start included: the old whole-file rewrite sent about 100x.
    assert proxy.sent <= 3 * final_size, (proxy.sent, final_size, objects)
    assert [r["step"] for r in MetricsFile(RunFolder(f"s3://{bucket}/run")).records] == list(range(1, 201))


def test_segments_read_as_one_file_by_report_and_by_the_resume_truncation(s3_env) -> None:
    bucket = s3_env.create_bucket("metrics-truncate")
    url = f"s3://{bucket}/run"
    first = MetricsFile(RunFolder(url))
    log_steps(first, range(1, SEGMENT_RECORDS + 201))  # more than one full segment
    first.flush()
    assert len(stored_objects(s3_env, bucket)) > 1
    assert [r["step"] for r in load_history(url).records] == list(range(1, SEGMENT_RECORDS + 201))

    resumed = MetricsFile(RunFolder(url))  # a run resumed from the checkpoint of step 140
    resumed.truncate_after(140)
    assert [r["step"] for r in MetricsFile(RunFolder(url)).records] == list(range(1, 141))
    log_steps(resumed, range(141, 161))
    resumed.flush()
    assert [r["step"] for r in load_history(url).records] == list(range(1, 161))


def test_a_record_of_a_checkpointed_step_is_stored_with_the_checkpoint(s3_env) -> None:
    bucket = s3_env.create_bucket("metrics-checkpoint")
    url = f"s3://{bucket}/run"
    metrics = MetricsFile(RunFolder(url))
    log_steps(metrics, range(1, 2 * CHECKPOINT_EVERY + 5))  # killed after step 44: no flush at the end
    stored = [r["step"] for r in MetricsFile(RunFolder(url)).records]
    assert stored == list(range(1, 2 * CHECKPOINT_EVERY + 1))


def test_a_local_output_dir_keeps_one_appended_metrics_jsonl(tmp_path: Path) -> None:
    metrics = MetricsFile(RunFolder(str(tmp_path)))
    log_steps(metrics, range(1, 31))
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 30
