"""Hostile runs of the training CLI: branching resumes, preemption, hangs, changed configs, leftovers."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from dist_kp.engine.checkpoint import CheckpointStore
from dist_kp.config import CheckpointConfig
from dist_kp.distributed.preemption import stalled_message
from dist_kp.storage.run_folder import RunFolder
from tests.conftest import (
    TINY_CONFIG,
    LogReader,
    check,
    child_env,
    run_module,
    start_module,
    tiny_overrides,
    train_for_fixture,
    train_here,
    wait_until,
)

QUIET = ("train.workers=0", "eval.every_epochs=0", "eval.at_end=false", "checkpoint.every_steps=1")


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), *tiny_overrides(data, out, *QUIET, *extra)]


def store_of(out: Path) -> CheckpointStore:
    return CheckpointStore(RunFolder(str(out)), CheckpointConfig())


def resumed_from(log: str) -> str:
    found = re.search(r"resumed from (\S+) at step", log)
    assert found, log[-3000:]
    return found.group(1)


@pytest.fixture(scope="module")
def four_steps(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of 4 steps, a checkpoint at every step (the default keep_last=3 keeps 2, 3, 4)."""
    out = tmp_path_factory.mktemp("four") / "k"
    train_for_fixture(train_args(synthetic_root, out, "train.max_steps=4"))
    assert store_of(out).steps() == [2, 3, 4]
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "k"
    shutil.copytree(run, out)
    return out


def test_resuming_an_earlier_step_keeps_the_new_checkpoints_and_auto_continues_them(
    four_steps: Path, synthetic_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    out = copy_of(four_steps, tmp_path)
    branch = f"{out}/checkpoints/step_00000002"
    result = check(train_here(train_args(synthetic_root, out, "train.max_steps=3", "checkpoint.keep_last=1",
                                         f"checkpoint.resume={branch}"), capfd))
    assert "checkpoint step 3 saved" in result.stderr
    store = store_of(out)
    assert 3 in store.steps() and store.manifest(3)["origin"] == branch
    (url, state), _ = store.resolve("auto")
    # The next `resume=auto` continues this run's step 3, not the earlier run's step 4.
    assert url.endswith("step_00000003") and state["progress"]["step"] == 3
    assert 4 in store.steps()  # another run's checkpoint: not deleted to make room


def test_an_unloadable_checkpoint_beside_valid_ones_never_displaces_the_new_ones(
    four_steps: Path, synthetic_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    out = copy_of(four_steps, tmp_path)
    bad = out / "checkpoints" / "step_00000009"
    shutil.copytree(out / "checkpoints" / "step_00000004", bad)
    data = bytearray((bad / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: the manifest's sizes match, its sha256 does not
    (bad / "state.pt").write_bytes(bytes(data))
    result = check(train_here(train_args(synthetic_root, out, "train.max_steps=6", "checkpoint.keep_last=1"), capfd))
    assert resumed_from(result.stderr).endswith("step_00000004")
    assert "checkpoint step 5 saved" in result.stderr and "checkpoint step 6 saved" in result.stderr
    url, state = store_of(out).latest()
    assert url.endswith("step_00000006") and state["progress"]["step"] == 6


def read_until(process: subprocess.Popen, needle: str, timeout: float = 300) -> str:
    lines = []
    deadline = time.monotonic() + timeout
    for line in process.stderr:
        lines.append(line)
        if re.search(needle, line) or time.monotonic() > deadline:
            break
    return "".join(lines)


def test_an_explicit_resume_applies_to_the_first_start_only(four_steps: Path, synthetic_root: Path,
                                                            tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    out = copy_of(four_steps, tmp_path)
    args = train_args(synthetic_root, out, "train.max_steps=12", f"checkpoint.resume={out}/checkpoints/step_00000002")
    run = start_module("dist_kp.train", args)
    log = read_until(run, r"checkpoint step 5 saved")
    run.send_signal(signal.SIGTERM)
    log += run.stderr.read()
    assert run.wait(timeout=120) == 143, log[-3000:]
    saved = max(int(s) for s in re.findall(r"checkpoint step (\d+) saved", log))
    assert saved >= 5
    result = check(train_here(args, capfd))
    assert resumed_from(result.stderr).endswith(f"step_{saved:08d}")
    assert "taken by an earlier start of this run" in result.stderr
    assert "training finished at step 12" in result.stderr


def test_a_signal_during_a_step_that_never_ends_ends_the_process_after_the_grace_time(
    synthetic_root: Path, tmp_path: Path
) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    args = train_args(synthetic_root, tmp_path / "run", "train.max_steps=10", "train.stop_grace_s=3",
                      "train.hooks=[tests.hook_probe:StuckStepHook]")
    run = start_module("dist_kp.train", args, env=child_env(PROBE_DIR=str(probe)))
    deadline = time.monotonic() + 300
    while not (probe / "stuck").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (probe / "stuck").exists(), run.stderr.read()[-3000:]
    run.send_signal(signal.SIGTERM)
    try:
        status = run.wait(timeout=60)  # stop_grace_s is 3 s: 60 s means it would never have ended
    finally:
        run.kill()
    log = run.stderr.read()
    assert status == 143, log[-3000:]
    assert "did not end within 3 s" in log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """True when a socket listens on `port` (read from /proc/net/tcp and tcp6, without connecting)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # 0A: LISTEN
                return True
    return False


def test_a_signal_before_training_starts_ends_the_process_promptly(synthetic_root: Path, tmp_path: Path) -> None:
    # Rank 0 of 2 whose peer never comes: it waits in the rendezvous for the collective timeout.
    port = free_port()
    env = child_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args = train_args(synthetic_root, tmp_path / "run", "train.dist_timeout_s=900")
    run = start_module("dist_kp.train", args, env=env)
    # Rank 0 hosts the rendezvous store: once its port listens, the process is waiting for its peer.
    log = LogReader(run)
    wait_until(lambda: listening(port), f"rank 0 listening on port {port}", process=run)
    run.send_signal(signal.SIGTERM)
    try:
        status = run.wait(timeout=30)
    finally:
        run.kill()
    assert status != 0, log.finish()[-3000:]


def test_resuming_mid_epoch_on_another_number_of_processes_continues_with_a_warning(
    synthetic_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    # 1 process: 12 steps per epoch; stopped at step 8, mid-epoch: 32 of 48 samples trained. 2 processes
    # train the other 16 in 2 steps (epoch 0 ends at step 10), then 6 steps per epoch.
    check(train_here(train_args(synthetic_root, out, "train.max_steps=8"), capfd))
    result = check(run_module("dist_kp.train", train_args(synthetic_root, out, "train.max_steps=12"), nproc=2))
    assert ("resumed on 2 processes, checkpoint written by 1; continuing epoch 0 at sample 32 of 48 (2 steps per "
            "process left in it; 8 images per step, were 4: optim.lr is not rescaled)") in result.stderr
    assert "epoch 0 [2/2] step 10" in result.stderr
    assert "training finished at step 12 (epoch 1)" in result.stderr


def test_resuming_with_another_model_config_names_the_checkpoint_and_the_keys(four_steps: Path,
                                                                             synthetic_root: Path, tmp_path: Path,
                                                                             capfd: pytest.CaptureFixture) -> None:
    out = copy_of(four_steps, tmp_path)
    result = train_here(train_args(synthetic_root, out, "train.max_steps=6", "model.fpn_channels=64"), capfd)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"{out}/checkpoints/step_00000004" in result.stderr
    assert "model.fpn_channels (32 in the checkpoint, 64 now)" in result.stderr
    assert "Traceback" not in result.stderr


def test_temporary_files_of_a_killed_save_are_removed_at_the_next_start(four_steps: Path, synthetic_root: Path,
                                                                       tmp_path: Path) -> None:
    out = copy_of(four_steps, tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id that no longer runs
    leftover = out / "checkpoints" / "step_00000004" / f"state.pt.tmp-{dead.pid}"
    leftover.write_bytes(b"half a checkpoint")
    mine = out / f"config.yaml.tmp-{os.getpid()}"  # a live writer's file stays
    mine.write_bytes(b"being written")
    check(run_module("dist_kp.train", train_args(synthetic_root, out, "train.max_steps=5")))
    assert not leftover.exists() and mine.exists()


def no_process_id() -> int:
    """A process id no process can have (above the kernel's pid_max): its writer is known dead."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def test_start_removes_only_dist_kps_own_temporaries_of_dead_writers_and_names_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead, alive = no_process_id(), os.getpid()
    stale = [f"checkpoints/step_00000004/state.pt.tmp-{dead}", f"config.yaml.tmp-{dead}",
             f"eval/00000004/metrics.json.tmp-{dead}", f"tensorboard/events.out.tfevents.1.vm.7.0.tmp-{dead}"]
    users = [f"user_stuff/notes.tmp-{dead}", f"notes.tmp-{dead}", f"checkpoints/step_00000004/notes.txt.tmp-{dead}",
             f"user_stuff/config.yaml.tmp-{dead}"]
    plots = ("losses", "lr", "throughput", "ap", "predictions", "pr")
    live = [f"model_final.pt.tmp-{alive}", *(f"report/{plot}.png.tmp-{alive}" for plot in plots)]
    for name in stale + users + live:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"some bytes")
    with caplog.at_level(logging.INFO, logger="dist_kp.storage.run_folder"):
        removed = RunFolder(str(tmp_path)).remove_stale_temporaries()
    assert sorted(removed) == sorted(str(tmp_path / name) for name in stale)
    assert all((tmp_path / name).exists() for name in users + live)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "left 7 temporary files" in warnings[0], warnings
    assert str(tmp_path / live[0]) in warnings[0] and "and 2 more" in warnings[0]


def test_report_skips_lines_of_metrics_jsonl_that_are_not_records(tmp_path: Path, caplog) -> None:
    from dist_kp.report import load_history

    lines = [{"step": 1, "train/loss": 3.0}, [1, 2], "text", {"step": "two"}, {"step": 2, "train/loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    history = load_history(str(tmp_path))
    assert history.series("train/loss") == ([1, 2], [3.0, 2.0])
    assert "line 2 is not a metrics record" in caplog.text


@pytest.mark.parametrize(("grace_s", "said"), [(0.5, "within 0.5 s"), (3, "within 3 s"), (120.0, "within 120 s")])
def test_a_fractional_stop_grace_is_said_as_configured(grace_s: float, said: str) -> None:
    assert said in stalled_message(1, signal.SIGTERM, grace_s)  # was "within 0 s" for 0.5


def test_after_the_grace_a_save_in_flight_completes_before_the_process_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """The epoch end saved in the background before a long evaluation is not lost to a short grace."""
    import threading

    from dist_kp.distributed.preemption import EXIT_PREEMPTED, PreemptionHandler

    save_done, ended = threading.Event(), threading.Event()
    order: list[str] = []

    def exit_process(status: int) -> None:  # this process (pytest's) must go on: record instead
        order.append(f"exit {status}")
        ended.set()

    def finish_save() -> None:
        order.append("grace over, save in flight")
        save_done.wait(30)
        order.append("save stored")

    monkeypatch.setattr("dist_kp.distributed.preemption.end_process", exit_process)
    handler = PreemptionHandler(grace_s=0.05)
    handler.before_exit.append(finish_save)
    handler._handle(signal.SIGTERM, None)  # the grace starts
    wait_until(lambda: order, "the grace over", 30)
    assert order == ["grace over, save in flight"]  # not ended while the save is in flight
    save_done.set()
    assert ended.wait(30)
    assert order == ["grace over, save in flight", "save stored", f"exit {EXIT_PREEMPTED}"]
