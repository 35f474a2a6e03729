"""One run per output folder: the lease OUTPUT_DIR/lease.json names the run that writes there.

    lease = RunLease.acquire(folder)   # rank 0, before anything is written into the folder
    ...                                # a thread refreshes the heartbeat every HEARTBEAT_S
    lease.release()                    # at the end: the next start takes the folder at once

At start the current lease decides (`lease_decision`, a pure function):
  - none, or released by a run that ended: taken;
  - the same job (SLURM_JOB_ID, torchrun's rendezvous id or agent: a requeue, a restart of the
    workers), even on another host: kept, with an info line;
  - a dead holder: taken over with a warning naming it. On its own host (same host name, boot and
    pid namespace) a holder is dead once its process is gone; anywhere, once its heartbeat is
    older than STALE_AFTER_S (host clocks are assumed to agree within a minute);
  - a live holder: refused (RunFolderInUse), naming it.

The heartbeat is a daemon thread, not a hook: it must stay fresh through what happens between
steps or outside them (reading the data index, a long evaluation, a checkpoint wait).

Not atomic: an object store has no create-if-absent, so the lease is written, read back and its
random token compared. Two starts that both read the old lease before either writes, and each
read back their own token before the other's write lands, both go on; that window is one write
and one read long (milliseconds). The loser finds out at its next heartbeat, which never writes
over another run's lease and logs an error naming the new holder.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Literal

from dist_kp.storage import StorageError
from dist_kp.storage.run_folder import RunFolder, process_alive

log = logging.getLogger(__name__)

HEARTBEAT_S = 60.0
# A holder silent this long is dead: a heartbeat write may take minutes on a struggling object store.
STALE_AFTER_S = 5 * HEARTBEAT_S

Action = Literal["take", "keep", "take over", "refuse"]


class RunFolderInUse(Exception):
    """Another live run holds the output folder (the message names it and what to do)."""


def _machine() -> str | None:
    """Boot and pid namespace of this process: where a pid names the same process (Linux only)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


@dataclass(frozen=True)
class Holder:
    """The process that holds (or held) a lease, as written in lease.json."""

    host: str
    pid: int
    token: str  # random, per start: tells this start's write from another's
    started: float  # wall-clock seconds
    heartbeat: float
    job_id: str | None = None  # SLURM_JOB_ID
    run_id: str | None = None  # TORCHELASTIC_RUN_ID: torchrun's rendezvous id
    agent_pid: int | None = None  # the torchrun agent that started this worker
    machine: str | None = None
    released: float | None = None

    @classmethod
    def this_process(cls, now: float) -> Holder:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        return cls(host=socket.gethostname(), pid=os.getpid(), token=secrets.token_hex(8), started=now,
                   heartbeat=now, job_id=os.environ.get("SLURM_JOB_ID") or None,
                   run_id=run_id if run_id not in (None, "", "none") else None,  # "none": torchrun's default id
                   agent_pid=os.getppid() if run_id is not None else None, machine=_machine())

    @classmethod
    def from_json(cls, data: bytes, url: str) -> Holder:
        try:
            fields = json.loads(data)
            missing = [name for name in ("host", "pid", "token", "started", "heartbeat") if fields.get(name) is None]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            return cls(**{name: fields.get(name) for name in cls.__dataclass_fields__})
        except (ValueError, TypeError, AttributeError) as error:
            raise RunFolderInUse(f"{url} is not a run lease ({error}); if no run uses this folder, delete it") \
                from None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def same_machine(self, other: Holder) -> bool:
        return self.host == other.host and self.machine == other.machine

    def describe(self, now: float) -> str:
        """`host vm, pid 123, SLURM job 45, last heartbeat 12 s ago`."""
        parts = [f"host {self.host}", f"pid {self.pid}"]
        if self.job_id:
            parts.append(f"SLURM job {self.job_id}")
        if self.agent_pid:
            parts.append(f"torchrun agent pid {self.agent_pid}")
        return ", ".join([*parts, f"last heartbeat {now - self.heartbeat:.0f} s ago"])


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str  # why, for the log line or the refusal


def same_job(holder: Holder, me: Holder) -> str | None:
    """What makes `me` the same job as `holder` (a requeue, a torchrun restart), None if nothing does."""
    if holder.job_id and holder.job_id == me.job_id:
        return f"the same SLURM job {me.job_id}"
    if holder.run_id and holder.run_id == me.run_id:
        return f"the same torchrun run {me.run_id}"
    if holder.agent_pid and holder.agent_pid == me.agent_pid and holder.same_machine(me):
        return f"the same torchrun agent (pid {me.agent_pid})"
    if holder.pid == me.pid and holder.same_machine(me):
        return "this process"
    return None


def lease_decision(current: Holder | None, me: Holder, now: float, stale_after_s: float = STALE_AFTER_S,
                   alive: Callable[[int], bool] = process_alive) -> Decision:
    """What a start (`me`) does with the folder's lease `current` at wall-clock time `now` (see the module)."""
    if current is None:
        return Decision("take", "no lease")
    if current.released is not None:
        return Decision("take", f"released by the run that ended {now - current.released:.0f} s ago")
    job = same_job(current, me)
    if job:
        return Decision("keep", job)
    if current.same_machine(me) and not alive(current.pid):
        return Decision("take over", f"its process {current.pid} is gone")
    if now - current.heartbeat > stale_after_s:
        return Decision("take over", f"no heartbeat for {now - current.heartbeat:.0f} s (over {stale_after_s:.0f} s)")
    return Decision("refuse", "alive")


def read_holder(folder: RunFolder) -> Holder | None:
    """The lease in the folder, None when there is none."""
    try:
        data = folder.read_bytes(folder.lease)
    except StorageError as error:
        if isinstance(error.__cause__, FileNotFoundError):
            return None
        raise
    return Holder.from_json(data, folder.lease)


def _refusal(folder: RunFolder, holder: Holder, now: float, stale_after_s: float) -> RunFolderInUse:
    return RunFolderInUse(
        f"{folder.url} is in use by another run ({holder.describe(now)}; lease {folder.lease}): wait for it to end, "
        f"or choose another output_dir. A dead run's lease is taken over: on its host once its process is gone, "
        f"elsewhere once its heartbeat is {stale_after_s:.0f} s old")


class RunLease:
    """This run's hold on its folder: a heartbeat thread while it lasts, `release()` at the end."""

    def __init__(self, folder: RunFolder, holder: Holder, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.folder = folder
        self.holder = holder
        self.heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="dist_kp-lease", daemon=True)

    @classmethod
    def acquire(cls, folder: RunFolder, heartbeat_s: float = HEARTBEAT_S,
                stale_after_s: float = STALE_AFTER_S) -> RunLease:
        """Take the folder's lease and start the heartbeat; RunFolderInUse when a live run holds it."""
        now = time.time()
        me = Holder.this_process(now)
        current = read_holder(folder)
        decision = lease_decision(current, me, now, stale_after_s)
        if decision.action == "refuse":
            raise _refusal(folder, current, now, stale_after_s)
        if decision.action == "take over":
            log.warning("%s: taking over the lease of a dead run (%s): %s", folder.url, current.describe(now),
                        decision.reason)
        elif decision.action == "keep":
            log.info("%s: lease kept by %s (was pid %d on %s)", folder.url, decision.reason, current.pid, current.host)
        folder.write(folder.lease, me.to_json())
        written = read_holder(folder)
        if written is None or written.token != me.token:
            raise RunFolderInUse(f"{folder.url}: another run started at the same moment and holds it now "
                                 f"({written.describe(time.time()) if written else 'its lease was deleted'}); "
                                 "wait for it to end, or choose another output_dir")
        lease = cls(folder, me, heartbeat_s)
        lease._thread.start()
        return lease

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._refresh()
            except (StorageError, RunFolderInUse) as error:
                log.warning("lease heartbeat of %s failed: %s", self.folder.url, error)

    def _refresh(self) -> None:
        current = read_holder(self.folder)
        if current is None or current.token != self.holder.token:
            # Never written over: another run took the folder over (this run's heartbeat went stale).
            log.error("%s: this run's lease was taken over by another run (%s); its files there may mix with ours",
                      self.folder.url, current.describe(time.time()) if current else "lease deleted")
            self._stop.set()
            return
        holder = replace(self.holder, heartbeat=time.time())
        self.folder.write(self.folder.lease, holder.to_json())
        self.holder = holder

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (if it is still this run's); never raises."""
        self._stop.set()
        self._thread.join()
        try:
            current = read_holder(self.folder)
            if current is not None and current.token == self.holder.token:
                self.folder.write(self.folder.lease, replace(self.holder, released=time.time()).to_json())
        except (StorageError, RunFolderInUse) as error:
            log.warning("%s: the lease could not be released (%s); the next start takes it over", self.folder.url,
                        error)
