"""Preemption: SIGUSR1 / SIGTERM ask for a checkpoint and a clean exit at the next step boundary.

SLURM sends SIGUSR1 before the time limit (`--signal=USR1@120`) or on preemption; some sites
send only SIGTERM. The handler only sets a flag. After every step all ranks agree on it (one
tiny all-reduce); then the step is checkpointed, and under SLURM rank 0 requeues the job
(`scontrol requeue`), so the job comes back and resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable
from types import FrameType

from dist_kp import distributed

log = logging.getLogger(__name__)

# Exit status of a run stopped by a signal that is not coming back by itself (no SLURM requeue).
EXIT_PREEMPTED = 143
# Tries of `scontrol show job` (the teardown of a requeued job can end each one; a busy controller errs).
REREADS = 5

_job_requeued = False


def job_requeued() -> bool:
    """True once this process stopped for a signal and its SLURM job was requeued (the job comes back).

    A wrapper that runs the training in-process (submitit) must then exit without reporting a result.
    """
    return _job_requeued


def end_process(status: int) -> None:
    """End now, from any thread, whatever the main thread is stuck in: the log flushed, nothing else run."""
    logging.shutdown()
    os._exit(status)


def stalled_message(rank: int, signum: int, grace_s: float) -> str:
    return (f"rank {rank}: {signal.Signals(signum).name} received, but the current step did not end within "
            f"{grace_s:g} s (train.stop_grace_s); exiting without a checkpoint (the run resumes from the previous one)")


class PreemptionHandler:
    """Signal handlers that ask for a stop at the next step boundary, and say on every rank at once when to stop.

    Until `install` (when training starts) the signals keep their default action: a signal
    during start-up (data index, rendezvous, loading) ends the process at once, as there is
    no step boundary yet to stop at. After a signal, a step that does not end within
    `grace_s` (a hung collective, a stuck loader) ends the process without a checkpoint.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, grace_s: float = 120.0) -> None:
        self.received: int | None = None
        self.grace_s = grace_s
        self._watchdog: threading.Timer | None = None
        # Run when the grace is over, before the process ends: a save in flight completes, so the
        # epoch end saved before a long evaluation is not lost with it.
        self.before_exit: list[Callable[[], None]] = []

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Give the signals their default action back and drop the exit callbacks.

        Installed, the handlers reach the model through `before_exit` (the checkpointer): they would
        keep DDP, and with it the process group's threads, alive into interpreter shutdown.
        """
        if self._watchdog is not None:
            self._watchdog.cancel()
        for sig in self.SIGNALS:
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, signal.SIG_DFL)
        self.before_exit.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # A second signal (e.g. SIGTERM after SIGUSR1) must not interrupt the save in progress.
        if self.received is not None:
            return
        self.received = signum
        self._watchdog = threading.Timer(self.grace_s, self._give_up, args=(signum,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _give_up(self, signum: int) -> None:
        log.error("%s", stalled_message(distributed.get_rank(), signum, self.grace_s))
        for finish in self.before_exit:
            try:
                finish()
            except Exception as error:  # noqa: BLE001 - the process ends either way; say why the finish failed
                log.error("rank %d: before exiting: %s", distributed.get_rank(), error)
        end_process(EXIT_PREEMPTED)

    def should_stop(self) -> bool:
        """Collective: True on every rank when any rank received a signal (the step boundary is reached)."""
        stop = distributed.any_rank(self.received is not None)
        if stop and self._watchdog is not None:
            self._watchdog.cancel()
        return stop

    def finish(self) -> int:
        """After the checkpoint: requeue the SLURM job (rank 0) and return the exit status."""
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        job_id = os.environ.get("SLURM_JOB_ID")
        requeued = False
        job = _slurm_job(job_id) if distributed.is_main_process() and job_id else None
        if job is not None and _requeue_allowed(job_id, job):
            requeued = _requeue(job_id, job, name)
        elif distributed.is_main_process():
            log.warning("stopped by %s: checkpoint saved; start the same command again to resume", name)
        requeued = bool(distributed.broadcast_object(requeued))
        global _job_requeued
        _job_requeued = requeued
        return 0 if requeued else EXIT_PREEMPTED


def _slurm_job(job_id: str) -> str | None:
    """`scontrol show job` of the job, or None when SLURM cannot be asked (said in the log).

    A read that fails is tried again, REREADS times in all: after a requeue SLURM ends every process
    of the job, an scontrol started while that teardown goes on among them, and a busy controller
    answers with an error.
    """
    failure = ""
    for _ in range(REREADS):
        try:
            result = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            # Inside a container without SLURM's tools: the batch script requeues on our exit status.
            log.warning("scontrol is not available here; exiting with status %d for the batch script to requeue",
                        EXIT_PREEMPTED)
            return None
        except (OSError, subprocess.SubprocessError) as error:
            log.error("cannot ask SLURM about job %s: %s", job_id, error)
            return None
        if result.returncode == 0:
            return result.stdout
        failure = (f"ended by {signal.Signals(-result.returncode).name}" if result.returncode < 0
                   else result.stderr.strip() or f"exit status {result.returncode}")
    log.error("cannot ask SLURM about job %s (`scontrol show job`, %d tries): %s", job_id, REREADS, failure)
    return None


def _requeue_allowed(job_id: str, job: str) -> bool:
    if "Requeue=1" not in job:
        log.warning("SLURM job %s was submitted without --requeue; not requeueing", job_id)
        return False
    state = re.search(r"JobState=(\S+)", job)
    if state and state.group(1) != "RUNNING":
        # A warning (--signal=USR1@120, scancel --signal, a preemption's grace time) comes while
        # the job runs; `scancel JOB` makes it COMPLETING at once: the user wants it gone.
        log.warning("SLURM job %s is %s (cancelled, or SLURM requeues it itself): not requeueing; "
                    "submit the same command again to resume", job_id, state.group(1))
        return False
    return True


def _restarts(job: str | None) -> int | None:
    found = re.search(r"Restarts=(\d+)", job or "")
    return int(found.group(1)) if found else None


def _requeue(job_id: str, job: str, name: str) -> bool:
    """`scontrol requeue` the job; True when SLURM took it back.

    The requeue ends the job's processes at once, and scontrol is one of them (a child of this
    rank): it can be killed by SLURM's SIGTERM after the requeue took effect and before it exits
    0. Killed by a signal, the job's restart count says whether the requeue happened; the reads of
    it can be ended by the same teardown (seen on the two-node test cluster under load), so a few
    are tried.
    """
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode == 0:
        log.info("stopped by %s: checkpoint saved, SLURM job %s requeued", name, job_id)
        return True
    if result.returncode < 0:
        ended = f"ended by {signal.Signals(-result.returncode).name}"
        before, after = _restarts(job), _restarts(_slurm_job(job_id))
        if before is not None and after is not None and after > before:
            log.info("stopped by %s: checkpoint saved, SLURM job %s requeued (restart %d; `scontrol requeue` was %s "
                     "as the requeue ended the job's processes)", name, job_id, after, ended)
            return True
        detail = (f"{ended}, and the job's restart count stayed {before}" if after is not None
                  else f"{ended}, and the job's restart count could not be read after it")
    else:
        detail = result.stderr.strip() or f"exit status {result.returncode}"
    log.error("stopped by %s: checkpoint saved, but `scontrol requeue %s` failed: %s", name, job_id, detail)
    return False
