"""Transient object-store errors (503 SlowDown, 500 InternalError, a reset connection) are retried
with backoff within storage.timeout_s; lasting ones fail in bounded time; 403 and 404 are never retried.

In-process, against SeaweedFS behind tests/fault_proxy.py, which answers the requests it is told to
fail in place of the server and passes the rest through unchanged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
import torch

from dist_kp.config import CheckpointConfig
from dist_kp.engine.checkpoint import CheckpointStore
from dist_kp.storage import Storage, StorageError
from dist_kp.storage.run_folder import RunFolder
from tests.conftest import environment
from tests.fault_proxy import INTERNAL_ERROR, RESET, SLOW_DOWN, FaultProxy
from tests.s3_server import SECRET_KEY, VOLUME_SLOTS

# A restart or an overload as clients see it: the next requests fail, then the server answers again.
OUTAGE = (SLOW_DOWN, INTERNAL_ERROR, RESET, SLOW_DOWN, INTERNAL_ERROR)
# The storage timeout of the tests where the server keeps failing: how long one request retries.
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def proxy(s3_server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint) as proxy:
        yield proxy


@pytest.fixture
def through_proxy(s3_server, proxy: FaultProxy) -> Iterator[FaultProxy]:
    """Clients of this test reach the S3 server through the proxy (credentials from the environment)."""
    proxy.reset()
    with environment(**{**s3_server.env(), "AWS_ENDPOINT_URL": proxy.endpoint}):
        yield proxy


def state(step: int) -> dict:
    return {"progress": {"epoch": 0, "batch": step, "step": step}, "epoch_end": False,
            "weights": torch.arange(250_000, dtype=torch.float32) * step}


def test_checkpoint_save_and_resume_survive_503_500_and_a_reset_connection(
        s3_server, through_proxy: FaultProxy, caplog: pytest.LogCaptureFixture) -> None:
    out = f"s3://{s3_server.create_bucket('transient')}/run"
    saver = CheckpointStore(RunFolder(out, Storage()), CheckpointConfig())
    saver.lineage = "saver"
    through_proxy.fail_next(*OUTAGE)
    with caplog.at_level(logging.WARNING, "dist_kp.storage"):
        saver.save(4, state(4))
        saver.close()
        assert through_proxy.failed == len(OUTAGE)
        through_proxy.fail_next(*OUTAGE)
        found, _ = CheckpointStore(RunFolder(out, Storage()), CheckpointConfig()).resolve("auto")
    assert through_proxy.failed == 2 * len(OUTAGE)
    assert found is not None and found[0] == f"{out}/checkpoints/step_00000004"
    assert torch.equal(found[1]["weights"], state(4)["weights"])
    retries = [r.getMessage() for r in caplog.records if "transient error" in r.getMessage()]
    assert retries and all("attempt 1 failed" in message for message in retries), retries
    assert any("503 SlowDown" in message or "(503)" in message for message in retries), retries
    assert SECRET_KEY not in caplog.text


def test_a_server_that_keeps_failing_ends_within_the_request_limit_naming_the_url_and_error(
        s3_server, through_proxy: FaultProxy) -> None:
    out = f"s3://{s3_server.create_bucket('always503')}/run"
    storage = Storage(timeout_s=TIMEOUT_S)
    store = CheckpointStore(RunFolder(out, storage), CheckpointConfig())
    through_proxy.fail_always(SLOW_DOWN)
    started = time.monotonic()
    with pytest.raises(StorageError) as failure:
        store.latest()
    elapsed = time.monotonic() - started
    assert TIMEOUT_S <= elapsed < storage.request_limit_s, elapsed
    assert through_proxy.requests > 2  # retried past botocore's former 2 attempts
    message = str(failure.value)
    assert f"{out}/checkpoints" in message and "transient error" in message and "503" in message, message
    assert "reached max retries" in message, message


def test_wrong_credentials_are_not_retried(s3_server, through_proxy: FaultProxy,
                                           caplog: pytest.LogCaptureFixture) -> None:
    url = f"s3://{s3_server.create_bucket('noretry403')}/run/a.json"
    s3_server.filesystem().pipe(url, b"{}")
    fresh = Storage({"skip_instance_cache": True}, timeout_s=TIMEOUT_S)  # a client that reads the wrong key
    with environment(AWS_SECRET_ACCESS_KEY="wrong-secret"), caplog.at_level(logging.WARNING, "dist_kp.storage"), \
            pytest.raises(StorageError, match="access denied"):
        RunFolder(url.rsplit("/", 1)[0], fresh).read_bytes(url)
    assert through_proxy.requests == 1
    assert "transient error" not in caplog.text


def test_a_missing_object_is_not_retried(s3_server, through_proxy: FaultProxy,
                                         caplog: pytest.LogCaptureFixture) -> None:
    folder = RunFolder(f"s3://{s3_server.create_bucket('noretry404')}/run", Storage(timeout_s=TIMEOUT_S))
    with caplog.at_level(logging.WARNING, "dist_kp.storage"), pytest.raises(StorageError, match="not found"):
        folder.read_bytes(folder.join("missing.json"))
    assert "transient error" not in caplog.text


def test_the_test_server_has_a_volume_for_every_bucket_whatever_the_free_disk(s3_server) -> None:
    # Each bucket takes a volume slot for good; the suite creates about a hundred. With slots
    # following the free disk (the server's default), a CI machine ran out part-way and every
    # later S3 test failed with 500 InternalError.
    slots, free = s3_server.volume_slots()
    assert slots == VOLUME_SLOTS
    assert free >= VOLUME_SLOTS // 2, f"only {free} of {slots} volume slots left"
