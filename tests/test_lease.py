"""One run per output folder: a live run's folder is refused to a second start, naming the holder;
a dead holder's lease is taken over; the same job (a requeue, a torchrun restart) keeps it."""

from __future__ import annotations

import itertools
import json
import logging
import re
import signal
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest

from dist_kp.storage import Storage
from dist_kp.storage.lease import Holder, RunFolderInUse, RunLease, lease_decision, read_holder
from dist_kp.storage.run_folder import LEASE, RunFolder
from tests.conftest import (
    TINY_CONFIG,
    LogReader,
    check,
    child_env,
    environment,
    kill_tree,
    run_module,
    start_module,
    tiny_overrides,
    wait_until,
)

NOW = 1_000_000.0


def holder(**fields) -> Holder:
    """A lease of another process on this machine, heartbeat fresh."""
    base = Holder(host="node-a", pid=1234, token="t-holder", started=NOW - 600, heartbeat=NOW - 5, machine="boot/ns")
    return replace(base, **fields)


def me(**fields) -> Holder:
    base = Holder(host="node-a", pid=5678, token="t-me", started=NOW, heartbeat=NOW, machine="boot/ns")
    return replace(base, **fields)


def alive(pid: int) -> bool:
    return True


def gone(pid: int) -> bool:
    return False


def test_a_live_holder_is_refused_and_a_dead_or_released_one_taken() -> None:
    assert lease_decision(None, me(), NOW).action == "take"
    assert lease_decision(holder(released=NOW - 30), me(), NOW, alive=alive).action == "take"
    # On its own machine a holder lives as long as its process; elsewhere as long as its heartbeat.
    assert lease_decision(holder(), me(), NOW, alive=alive).action == "refuse"
    dead = lease_decision(holder(), me(), NOW, alive=gone)
    assert dead.action == "take over" and dead.reason == "its process 1234 is gone"
    elsewhere = holder(host="node-b", machine="other-boot/ns")
    assert lease_decision(elsewhere, me(), NOW, stale_after_s=60, alive=gone).action == "refuse"
    stale = lease_decision(replace(elsewhere, heartbeat=NOW - 61), me(), NOW, stale_after_s=60, alive=gone)
    assert stale.action == "take over" and stale.reason == "no heartbeat for 61 s (over 60 s)"
    # A host name alone is not the machine: another boot or pid namespace may reuse the pid.
    rebooted = holder(machine="new-boot/ns")
    assert lease_decision(rebooted, me(), NOW, stale_after_s=60, alive=gone).action == "refuse"


def test_a_start_of_the_same_slurm_job_keeps_the_lease_even_on_another_host() -> None:
    with environment(SLURM_JOB_ID="4711"):
        requeued = Holder.this_process(NOW)
    running = holder(host="node-b", machine="other-boot/ns", job_id="4711")
    assert requeued.job_id == "4711"
    decision = lease_decision(running, requeued, NOW, alive=alive)
    assert decision.action == "keep" and decision.reason == "the same SLURM job 4711"
    assert lease_decision(replace(running, job_id="4712"), requeued, NOW, alive=alive).action == "refuse"


def test_restarted_torchrun_workers_keep_the_lease_of_their_agent() -> None:
    # torchrun's default rendezvous id is "none": then only the agent (the worker's parent) tells the job.
    with environment(TORCHELASTIC_RUN_ID="none"):
        restarted = Holder.this_process(NOW)
    assert restarted.run_id is None and restarted.agent_pid is not None
    worker = holder(host=restarted.host, machine=restarted.machine, agent_pid=restarted.agent_pid)
    assert lease_decision(worker, restarted, NOW, alive=alive).action == "keep"
    assert lease_decision(replace(worker, agent_pid=restarted.agent_pid + 1), restarted, NOW,
                          alive=alive).action == "refuse"
    # A rendezvous id names the job on every host: the new rank 0 may be elsewhere.
    with environment(TORCHELASTIC_RUN_ID="job-17"):
        moved = Holder.this_process(NOW)
    assert lease_decision(holder(host="node-b", machine="x", run_id="job-17"), moved, NOW, alive=alive).action == "keep"


def foreign_lease(heartbeat_age_s: float) -> bytes:
    """lease.json as a run on another host writes it."""
    now = time.time()
    return json.dumps({"host": "gpu-node-17", "pid": 4242, "token": "foreign", "started": now - 3600,
                       "heartbeat": now - heartbeat_age_s, "job_id": "777", "run_id": None, "agent_pid": None,
                       "machine": "other-boot/pid:[1]", "released": None}).encode()


_buckets = itertools.count()


@pytest.fixture
def s3_folder(s3_server):
    """A run folder in a fresh bucket of the test S3 server, this process's environment pointing at it."""
    bucket = s3_server.create_bucket(f"lease-{next(_buckets)}")
    with environment(**s3_server.env()):
        yield RunFolder(f"s3://{bucket}/run", Storage())


def test_on_s3_a_fresh_lease_of_another_host_is_refused_naming_it(s3_folder: RunFolder) -> None:
    s3_folder.write(s3_folder.lease, foreign_lease(heartbeat_age_s=20))
    with pytest.raises(RunFolderInUse) as refused:
        RunLease.acquire(s3_folder)
    assert re.search(r"s3://\S+/run is in use by another run \(host gpu-node-17, pid 4242, SLURM job 777, "
                     r"last heartbeat 2\d s ago; lease s3://\S+/run/lease\.json\): wait for it to end, or choose "
                     r"another output_dir", str(refused.value)), refused.value
    assert read_holder(s3_folder).token == "foreign"


def test_on_s3_a_stale_lease_of_another_host_is_taken_over_with_a_warning_then_kept_fresh_and_released(
        s3_folder: RunFolder, caplog: pytest.LogCaptureFixture) -> None:
    s3_folder.write(s3_folder.lease, foreign_lease(heartbeat_age_s=400))
    with caplog.at_level(logging.INFO, logger="dist_kp.storage.lease"):
        lease = RunLease.acquire(s3_folder, heartbeat_s=0.2, stale_after_s=300)
    try:
        assert re.search(r"taking over the lease of a dead run \(host gpu-node-17, pid 4242, SLURM job 777, last "
                         r"heartbeat 40\d s ago\): no heartbeat for 40\d s \(over 300 s\)", caplog.text), caplog.text
        first = read_holder(s3_folder)
        assert (first.host, first.pid) == (socket.gethostname(), lease.holder.pid)
        wait_until(lambda: read_holder(s3_folder).heartbeat > first.heartbeat, "a heartbeat", timeout=30)
    finally:
        lease.release()
    assert read_holder(s3_folder).released is not None
    RunLease.acquire(s3_folder).release()  # a released lease is taken at once


def test_a_heartbeat_never_writes_over_a_lease_another_run_took(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    folder = RunFolder(str(tmp_path / "run"))
    with caplog.at_level(logging.INFO, logger="dist_kp.storage.lease"):
        lease = RunLease.acquire(folder, heartbeat_s=0.1)
        folder.write(folder.lease, foreign_lease(heartbeat_age_s=0))
        wait_until(lambda: "lease was taken over by another run (host gpu-node-17" in caplog.text, "the loss logged",
                   timeout=30)
        lease.release()
    assert read_holder(folder).token == "foreign" and read_holder(folder).released is None


def run_files(out: Path) -> dict[str, bytes]:
    """Every file of a run folder but the lease (whose heartbeat changes), with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != LEASE}


def test_a_second_start_on_a_live_runs_folder_is_refused_and_takes_over_once_the_run_is_killed(
        synthetic_root: Path, tmp_path: Path) -> None:
    probe, out = tmp_path / "probe", tmp_path / "run"
    probe.mkdir()
    env = child_env(PROBE_DIR=str(probe))
    args = ["--config", str(TINY_CONFIG), *tiny_overrides(
        synthetic_root, out, "train.max_steps=8", "checkpoint.every_steps=4", "train.workers=0",
        "eval.every_epochs=0", "eval.at_end=false", "train.hooks=[tests.hook_probe:HoldHook]")]
    first = start_module("dist_kp.train", args, nproc=2, env={**env, "HOLD_AT_STEP": "5"})
    try:
        log = LogReader(first)
        for held in (probe / "held0", probe / "held1"):
            wait_until(held.exists, f"{held.name} written: the rank holds", process=first)
        log.wait_for(r"checkpoint step 4 saved")
        holder_pid = int((probe / "held0").read_text())
        before = run_files(out)
        refused = run_module("dist_kp.train", args, nproc=2, env=env, timeout=300)
        # Each worker exits with status 2 (torchrun itself with 1).
        assert refused.returncode != 0 and re.search(r"exitcode\s*: 2 ", refused.stderr), refused.stderr[-3000:]
        # Every rank leaves with the holder's name, before building anything or writing into the folder.
        for rank in (0, 1):
            assert re.search(rf"\[rank{rank}\] ERROR .* is in use by another run \(host {socket.gethostname()}, "
                             rf"pid {holder_pid}, torchrun agent pid \d+, last heartbeat \d+ s ago",
                             refused.stderr), refused.stderr[-3000:]
        assert "training images" not in refused.stderr
        assert run_files(out) == before
    finally:
        kill_tree(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    resumed = check(run_module("dist_kp.train", args, nproc=2, env=env)).stderr
    assert re.search(rf"WARNING .*taking over the lease of a dead run \(host {socket.gethostname()}, pid {holder_pid}, "
                     rf".*\): its process {holder_pid} is gone", resumed), resumed[-3000:]
    assert re.search(r"resumed from .*step_00000004 at step 4 ", resumed) and "training finished at step 8" in resumed
    assert read_holder(RunFolder(str(out))).released is not None
