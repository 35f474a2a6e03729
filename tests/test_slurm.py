"""SLURM: the user's sbatch command, preemption with requeue, submitit, torchrun restarts, crashes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from dist_kp.storage.run_folder import names_a_run_file
from tests.conftest import (
    REPO,
    TINY_CONFIG,
    LogReader,
    check,
    child_env,
    descendants,
    module_command,
    run_module,
    start_module,
    tiny_overrides,
    wait_until,
)

# Collective timeout of the crash test: longer than its subprocess timeout, so a rank left waiting fails the test.
COLLECTIVE_TIMEOUT_S = 600

STEPS = 12
TRAIN = ("train.max_steps=12", "checkpoint.every_steps=50", "eval.every_epochs=0", "train.workers=0",
         "train.log_every=1")
SBATCH_CPU = ("--ntasks-per-node=2", "--cpus-per-task=1")


def sbatch(slurm, workdir: Path, root: Path, out: Path, *extra: str) -> str:
    env_export = f"--export=ALL,PYTHON={sys.executable},OMP_NUM_THREADS=1"
    args = ["sbatch", "--parsable", f"--chdir={workdir}", env_export, *SBATCH_CPU,
            str(REPO / "slurm" / "train_8gpu.sh"), str(TINY_CONFIG), f"data.root={root}", f"output_dir={out}", *TRAIN,
            *extra]
    return slurm.run(*args).stdout.strip().split(";")[0]


def job_log(workdir: Path, job_id: str) -> str:
    path = workdir / f"dist_kp-{job_id}.log"
    return path.read_text() if path.exists() else ""


def wait_for_log(workdir: Path, job_id: str, needle: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = job_log(workdir, job_id)
        if re.search(needle, text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"{needle!r} not in the log of job {job_id} within {timeout} s:\n{job_log(workdir, job_id)[-3000:]}")


def final_weights(out: Path) -> dict:
    return torch.load(out / "model_final.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def uninterrupted(slurm, synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """The user's command, as typed, run to completion on the cluster."""
    workdir = tmp_path_factory.mktemp("sbatch")
    out = workdir / "run"
    job_id = sbatch(slurm, workdir, synthetic_root, out, "eval.at_end=true")
    info = slurm.wait_job(job_id, timeout=600)
    return out, job_id, f"{info.get('JobState')} {info.get('ExitCode')}\n" + job_log(workdir, job_id)


def test_sbatch_script_trains_to_completion(uninterrupted) -> None:
    out, job_id, log = uninterrupted
    assert log.startswith("COMPLETED 0:0"), log[-3000:]
    assert (out / "model_final.pt").exists()
    assert (out / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json").exists()
    assert "keypoints (OKS):" in log and "Average Precision" in log
    assert "world size 2" in log and f"SLURM job {job_id}, restart count 0" in log


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_preempted_job_saves_requeues_resumes_and_ends_identical(slurm, uninterrupted, synthetic_root: Path,
                                                                tmp_path: Path, sig: str) -> None:
    out = tmp_path / "run"
    job_id = sbatch(slurm, tmp_path, synthetic_root, out)
    wait_for_log(tmp_path, job_id, r"\] step 5 ")
    signalled = time.monotonic()
    slurm.run("scancel", f"--signal={sig}", job_id)  # as SLURM does before the limit: to the job's steps
    log = wait_for_log(tmp_path, job_id, r"restart count 1", timeout=300)
    saved = int(re.search(r"stopped by SIG\w+: checkpoint saved, SLURM job \d+ requeued", log) and
                re.findall(r"checkpoint step (\d+) saved", log)[-1])
    wait_for_log(tmp_path, job_id, rf"resumed from .*step_{saved:08d} at step {saved}", timeout=300)
    training_again = time.monotonic() - signalled
    info = slurm.wait_job(job_id, timeout=600)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job_log(tmp_path, job_id)[-3000:]
    assert info.get("Restarts") == "1"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    expected, got = final_weights(uninterrupted[0]), final_weights(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    print(f"SIG{sig}: resumed from step {saved}; {training_again:.1f} s from signal to training again")


def test_submitit_job_completes_on_the_cluster_through_a_preemption(slurm, uninterrupted, synthetic_root: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "run"
    launcher = subprocess.Popen(module_command("dist_kp.submit", [
        "--config", str(TINY_CONFIG), "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
        "--cpus-per-task", "1", "--time", "20", "--logs", str(tmp_path / "logs"), "--wait",
        *tiny_overrides(synthetic_root, out, *TRAIN, "eval.at_end=false")]), cwd=REPO, env=child_env(**slurm.env),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in launcher.stderr:
        lines.append(line)
        if "logs: " in line:
            break
    job_id = re.search(r"submitted job (\d+)", "".join(lines)).group(1)
    rank0_log = tmp_path / "logs" / job_id / f"{job_id}_0_log.err"
    deadline = time.monotonic() + 300
    while not re.search(r"\] step 5 ", rank0_log.read_text() if rank0_log.exists() else ""):
        assert time.monotonic() < deadline and launcher.poll() is None, "".join(lines)
        time.sleep(0.5)
    slurm.run("scancel", "--signal=USR1", job_id)
    log = "".join(lines) + launcher.communicate(timeout=600)[1]
    assert launcher.returncode == 0 and f"job {job_id} completed" in log, log[-3000:]
    worker_log = rank0_log.read_text()
    assert "stopped by SIGUSR1: checkpoint saved, SLURM job" in worker_log
    assert re.search(r"resumed from .*step_\d+ at step \d+ ", worker_log) and "restart count 1" in worker_log
    assert slurm.job(job_id).get("Restarts") == "1"
    expected, got = final_weights(uninterrupted[0]), final_weights(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_submit_local_runs_the_training_in_a_local_process_and_keeps_its_logs_in_the_output_dir(
        synthetic_root: Path, tmp_path: Path) -> None:
    out, cwd = tmp_path / "run", tmp_path / "cwd"
    cwd.mkdir()
    result = check(subprocess.run(module_command("dist_kp.submit", [
        "--config", str(TINY_CONFIG), "--local", "--wait",
        *tiny_overrides(synthetic_root, out, "train.max_steps=2", "train.workers=0", "eval.at_end=false")]),
        cwd=cwd, env=child_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600))
    job_id = re.search(r"submitted job (\d+)", result.stderr).group(1)
    assert "completed" in result.stderr
    assert (out / "model_final.pt").exists()
    assert list(cwd.iterdir()) == []  # no submitit_logs/ (nor a folder named %j) where the command ran
    assert (out / "submitit" / f"{job_id}_0_log.err").exists()
    assert not any("%" in p.name for p in out.rglob("*"))
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert [f for f in files if not names_a_run_file(f)] == []  # the run folder names submitit/ too


def test_submitit_invalid_partition_is_a_clear_error(slurm, tmp_path: Path) -> None:
    result = run_module("dist_kp.submit", ["--config", str(TINY_CONFIG), "--partition", "no-such-partition",
                                          "--logs", str(tmp_path / "logs")], env=child_env(**slurm.env))
    assert result.returncode == 2
    assert "submission refused" in result.stderr and "partition" in result.stderr.lower()


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_a_signal_for_the_batch_shell_is_passed_on_to_the_workers_which_save_and_requeue(
        slurm, synthetic_root: Path, tmp_path: Path, sig: str) -> None:
    out = tmp_path / "run"
    job_id = sbatch(slurm, tmp_path, synthetic_root, out)
    wait_for_log(tmp_path, job_id, r"\] step 3 ")
    slurm.run("scancel", "--batch", f"--signal={sig}", job_id)  # as --signal=B:USR1@120 does: the batch shell only
    log = wait_for_log(tmp_path, job_id, r"stopped by SIGUSR1: checkpoint saved, SLURM job \d+ requeued")
    slurm.run("scancel", job_id)  # the requeued run is the other tests' subject
    slurm.wait_job(job_id, timeout=120)
    assert f"batch shell: SIG{sig}, passed on to the workers as SIGUSR1" in log
    saved = int(re.findall(r"checkpoint step (\d+) saved", log)[-1])
    assert saved >= 3 and (out / "checkpoints" / f"step_{saved:08d}" / "manifest.json").exists()


def test_scancel_of_the_job_saves_a_checkpoint_and_does_not_requeue(slurm, synthetic_root: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "run"
    job_id = sbatch(slurm, tmp_path, synthetic_root, out, "train.max_steps=400")
    wait_for_log(tmp_path, job_id, r"\] step 3 ")
    slurm.run("scancel", job_id)  # SIGTERM to every process of the job: the user ends it
    log = wait_for_log(tmp_path, job_id, r"SLURM job \d+ is COMPLETING .*not requeueing")
    # Once no process of the job is left, nothing can requeue it any more; once SLURM has finished
    # completing it, its state is final (a requeued job would be PENDING or RUNNING again instead).
    wait_until(lambda: not job_processes(job_id), f"every process of job {job_id} ended", timeout=120)
    info = wait_until(lambda: settled(slurm, job_id), f"job {job_id} no longer COMPLETING", timeout=120)
    assert info["JobState"] == "CANCELLED" and info.get("Restarts") == "0", info
    assert "restart count 1" not in job_log(tmp_path, job_id)
    saved = int(re.findall(r"checkpoint step (\d+) saved", log)[-1])
    assert saved >= 3 and (out / "checkpoints" / f"step_{saved:08d}" / "manifest.json").exists()


def test_sigterm_under_torchrun_saves_exits_nonzero_and_more_signals_during_the_save_do_not_corrupt_it(
        uninterrupted, synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--config", str(TINY_CONFIG), *tiny_overrides(synthetic_root, out, *TRAIN, "eval.at_end=false")]
    launcher = start_module("dist_kp.train", args, nproc=2)
    lines = []
    for line in launcher.stderr:
        lines.append(line)
        if re.search(r"\] step 4 ", line):
            break
    workers = [p for p in descendants(launcher.pid)
               if "dist_kp.train" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
    launcher.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers
    ended = threading.Event()

    def keep_signalling() -> None:  # SIGTERM and SIGUSR1 every 20 ms until the end, so some land during the save
        for n in range(100_000):
            if ended.wait(0.02):
                return
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGUSR1 if n % 2 else signal.SIGTERM)
                except ProcessLookupError:
                    pass

    signaller = threading.Thread(target=keep_signalling)
    signaller.start()
    try:
        log = "".join(lines) + launcher.stderr.read()
        launcher.wait(timeout=120)
    finally:
        ended.set()
        signaller.join()
    assert launcher.returncode != 0, log[-3000:]
    assert "stopped by SIGTERM: checkpoint saved; start the same command again to resume" in log, log[-3000:]
    saved = int(re.findall(r"checkpoint step (\d+) saved", log)[-1])
    assert 4 <= saved < STEPS
    resumed = check(run_module("dist_kp.train", args, nproc=2, timeout=600)).stderr
    assert re.search(rf"resumed from .*step_{saved:08d} at step {saved} ", resumed), resumed[-3000:]
    expected, got = final_weights(uninterrupted[0]), final_weights(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_torchrun_restarts_a_killed_worker_and_resumes(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--config", str(TINY_CONFIG), *tiny_overrides(synthetic_root, out, "train.max_steps=12",
                                                          "checkpoint.every_steps=3", "train.workers=0",
                                                          "eval.every_epochs=0", "eval.at_end=false")]
    launcher = subprocess.Popen(module_command("dist_kp.train", args, nproc=2, torchrun_args=("--max-restarts=1",)),
                                cwd=REPO, env=child_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                start_new_session=True)
    log = LogReader(launcher)
    # Saves finish in the background: the kill comes once step 6 is stored, not merely once step 7 ran.
    log.wait_for(r"checkpoint step 6 saved")
    log.wait_for(r"\] step 7 ")
    workers = [p for p in descendants(launcher.pid)
               if "dist_kp.train" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
    # Rank 0 dies, as on a failed GPU: it leaves the folder's lease behind, held.
    rank0 = [p for p in workers if b"RANK=0" in Path(f"/proc/{p}/environ").read_bytes().split(b"\0")]
    os.kill(rank0[0], signal.SIGKILL)
    text = log.finish(timeout=600)
    assert launcher.returncode == 0, text[-4000:]
    # The newest checkpoint stored when the worker died: step 6, or 9 if it was stored in between.
    resumed = re.search(r"resumed from .*step_(\d+) at step (\d+)", text)
    assert resumed and resumed.group(1).lstrip("0") == resumed.group(2) and int(resumed.group(2)) in (6, 9), text[-4000:]
    assert "training finished at step 12" in text
    # The restarted workers are the same job: the new rank 0 keeps the folder's lease, nobody is refused.
    assert re.search(r"lease kept by the same torchrun run \S+ \(was pid \d+ on ", text), text[-4000:]
    assert "taking over the lease" not in text and "in use by another run" not in text


def test_a_crash_on_one_rank_ends_every_rank_quickly(synthetic_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    # The second image of the annotation file is evaluated by rank 1 only (shards are positions rank::2).
    images = json.loads((root / "annotations" / "person_keypoints_val2017.json").read_text())["images"]
    victim = root / "val2017" / images[1]["file_name"]
    victim.write_bytes(b"not an image")
    args = ["--config", str(TINY_CONFIG), *tiny_overrides(root, tmp_path / "run", "train.max_steps=2",
                                                          "train.workers=0", "eval.at_end=true",
                                                          f"train.dist_timeout_s={COLLECTIVE_TIMEOUT_S}")]
    result = run_module("dist_kp.train", args, nproc=2, timeout=300)
    ended = time.time()
    assert result.returncode != 0
    assert f"cannot read evaluation image {victim}" in result.stderr
    error = re.search(r"^(\S+ \S+) \[rank1\] ERROR", result.stderr, re.MULTILINE)
    assert error, result.stderr[-3000:]
    # Rank 0 waits for rank 1 in the evaluation's gather: it must end with it, not at the collective timeout.
    # The bound is a fraction of that timeout, not a speed: a slow machine passes, a waiting rank 0 does not.
    assert ended - datetime.strptime(error.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() < COLLECTIVE_TIMEOUT_S / 5


def settled(slurm, job_id: str) -> dict[str, str] | None:
    """The job's fields once SLURM has finished completing it; None while it is COMPLETING."""
    job = slurm.job(job_id)
    return job if job["JobState"] != "COMPLETING" else None


def processes_with(*needles: bytes) -> list[tuple[int, bytes, list[bytes]]]:
    """(pid, cmdline, environment) of every process whose environment holds all `needles`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(needle in environ for needle in needles):
            found.append((int(entry.name), cmdline, environ))
    return found


def job_processes(job_id: str) -> list[int]:
    """The processes of a SLURM job on this machine (batch shell, srun, tasks)."""
    return [pid for pid, _, _ in processes_with(f"SLURM_JOB_ID={job_id}".encode())]


def worker_with_procid(procid: int) -> int:
    """The dist_kp.train task of SLURM rank `procid` (started by this test's cluster)."""
    for pid, cmdline, _ in processes_with(f"SLURM_PROCID={procid}".encode()):
        if b"dist_kp.train" in cmdline:
            return pid
    raise AssertionError(f"no dist_kp.train task with SLURM_PROCID={procid}")


def test_a_stopped_task_ends_the_job_step_non_zero_within_the_collective_timeout(slurm, synthetic_root: Path,
                                                                                 tmp_path: Path) -> None:
    timeout_s = 10  # the shortest train.dist_timeout_s
    out = tmp_path / "run"
    job_id = sbatch(slurm, tmp_path, synthetic_root, out, "train.max_steps=10000", f"train.dist_timeout_s={timeout_s}")
    wait_for_log(tmp_path, job_id, r"\] step 3 ")
    stopped = worker_with_procid(1)
    os.kill(stopped, signal.SIGSTOP)
    try:
        # Rank 0 times out; srun --kill-on-bad-exit ends the step, killing the stopped task too.
        info = slurm.wait_job(job_id, timeout=timeout_s + 120)
    finally:
        try:
            os.kill(stopped, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    log = job_log(tmp_path, job_id)
    assert re.search(rf"collective .* timed out after {timeout_s} s \(a rank stopped answering\)", log), log[-3000:]
