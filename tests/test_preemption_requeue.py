"""Rank 0's `scontrol requeue` after a preemption checkpoint, when the requeue kills scontrol itself.

SLURM ends every process of a requeued job at once, and scontrol, a child of rank 0, is one of
them: killed by SIGTERM after the requeue took effect, it does not exit 0 (seen on the test cluster
under three test workers: the job came back, rank 0 logged "`scontrol requeue 10` failed: " and
exited as not requeued). The stand-in `scontrol` below plays SLURM's side of that race; the real
cluster's side is tests/test_slurm.py.
"""

from __future__ import annotations

import logging
import signal
import stat
from pathlib import Path

import pytest

from dist_kp.distributed import preemption

STAND_IN = """#!/bin/sh
requeued="$(dirname "$0")/requeued"
case "$1" in
  show)
    # The teardown of a requeued job also ends the first reads after it (OUTCOME ..._reads_N: N of them).
    if [ -e "$requeued" ] && [ "${OUTCOME#*_reads_}" != "$OUTCOME" ] && [ "$(wc -l < "$requeued")" -lt "${OUTCOME#*_reads_}" ]; then
      echo >> "$requeued"; kill -TERM $$
    fi
    if [ -e "$requeued" ]; then echo "JobId=$3 JobState=REQUEUED Requeue=1 Restarts=1"
    else echo "JobId=$3 JobState=RUNNING Requeue=1 Restarts=0"; fi ;;
  requeue)
    case "$OUTCOME" in
      killed_after_requeue*) touch "$requeued"; kill -TERM $$ ;;
      killed_before_requeue) kill -TERM $$ ;;
      refused) echo "scontrol: error: Job is no longer pending execution" >&2; exit 1 ;;
    esac ;;
esac
"""


@pytest.fixture
def slurm_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """SLURM job 77 with a stand-in scontrol first on PATH; `outcome` picks what its requeue does."""
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(STAND_IN)
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{scontrol.parent}:/usr/bin:/bin")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setattr(preemption, "_job_requeued", False)

    def finish(outcome: str) -> int:
        monkeypatch.setenv("OUTCOME", outcome)
        handler = preemption.PreemptionHandler()
        handler.received = signal.SIGUSR1
        return handler.finish()

    return finish


def test_scontrol_killed_by_the_requeue_it_asked_for_counts_as_requeued(slurm_job, caplog) -> None:
    with caplog.at_level(logging.INFO, logger=preemption.__name__):
        status = slurm_job("killed_after_requeue")
    assert status == 0 and preemption.job_requeued()
    assert "stopped by SIGUSR1: checkpoint saved, SLURM job 77 requeued (restart 1; `scontrol requeue` was ended by " \
           "SIGTERM" in caplog.text
    assert "failed" not in caplog.text


@pytest.mark.parametrize("killed_reads", [1, preemption.REREADS - 1])
def test_reads_of_the_restart_count_ended_by_the_same_teardown_are_tried_again(slurm_job, caplog,
                                                                              killed_reads: int) -> None:
    """Seen on the two-node test cluster under load: the job came back, but the `scontrol show job` after the
    killed requeue was ended too, and rank 0 logged "failed: ..., the job's restart count could not be read"."""
    with caplog.at_level(logging.INFO, logger=preemption.__name__):
        status = slurm_job(f"killed_after_requeue_reads_{killed_reads}")
    assert status == 0 and preemption.job_requeued()
    assert "SLURM job 77 requeued (restart 1; `scontrol requeue` was ended by SIGTERM" in caplog.text
    assert "failed" not in caplog.text


def test_a_restart_count_that_no_read_gets_is_a_failure_that_says_so(slurm_job, caplog) -> None:
    status = slurm_job(f"killed_after_requeue_reads_{preemption.REREADS}")
    assert status == preemption.EXIT_PREEMPTED and not preemption.job_requeued()
    assert ("`scontrol requeue 77` failed: ended by SIGTERM, and the job's restart count could not be read after it"
            in caplog.text)


def test_scontrol_killed_without_a_requeue_is_a_failure_that_names_the_signal(slurm_job, caplog) -> None:
    status = slurm_job("killed_before_requeue")
    assert status == preemption.EXIT_PREEMPTED and not preemption.job_requeued()
    assert ("`scontrol requeue 77` failed: ended by SIGTERM, and the job's restart count stayed 0"
            in caplog.text)


def test_a_refused_requeue_is_a_failure_with_slurms_reason(slurm_job, caplog) -> None:
    status = slurm_job("refused")
    assert status == preemption.EXIT_PREEMPTED and not preemption.job_requeued()
    assert "`scontrol requeue 77` failed: scontrol: error: Job is no longer pending execution" in caplog.text
