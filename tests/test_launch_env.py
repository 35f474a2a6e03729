"""The launcher's environment: refused at once when incomplete, and one master port per SLURM job."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_kp import distributed
from dist_kp.distributed import LaunchError, launcher_ranks, master_port
from tests.conftest import REPO, TINY_CONFIG, child_env, run_module, tiny_overrides

JOB_IDS = (0, 1, 4999, 5000, 19999, 20000, 20001, 123456, 2**31 - 1)
# Every copy of the port formula in a shell script the user runs or copies.
PORT_FORMULA_FILES = ("slurm/train_8gpu.sh", "docker/README.md")


@pytest.fixture
def launcher_env(monkeypatch: pytest.MonkeyPatch):
    """Set the given launcher variables only; every one is restored after the test (also those set by the code)."""
    def set_env(env: dict[str, str]) -> None:
        for name in (*distributed.LAUNCHER_VARIABLES, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
    return set_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("path", PORT_FORMULA_FILES)
def test_shell_copies_of_the_master_port_formula_give_the_python_port(path: str) -> None:
    lines = re.findall(r"^MASTER_PORT=\$\(\(.*\)\)$", (REPO / path).read_text(), re.MULTILINE)
    assert len(lines) == 1, f"{path}: expected one MASTER_PORT=$((...)) line, found {lines}"
    for job_id in JOB_IDS:
        shell = subprocess.run(["bash", "-c", f"SLURM_JOB_ID={job_id}; {lines[0]}; echo $MASTER_PORT"],
                               capture_output=True, text=True, check=True)
        assert int(shell.stdout) == master_port(job_id), (path, job_id)


def test_srun_environment_gets_the_job_ids_master_port(launcher_env) -> None:
    launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "54321", "MASTER_ADDR": "127.0.0.1"})
    distributed.env_from_slurm()
    assert os.environ["MASTER_PORT"] == str(master_port(54321)) == "29321"


@pytest.mark.parametrize("env, missing", [
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "RANK, LOCAL_RANK, MASTER_PORT"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_PORT": "29500"}, "MASTER_ADDR"),
    ({"RANK": "1"}, "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"),
])
def test_incomplete_launcher_environment_is_refused_naming_the_missing_variables(
    launcher_env, env: dict[str, str], missing: str
) -> None:
    launcher_env(env)
    with pytest.raises(LaunchError, match=rf"incomplete launcher environment: {missing} not set"):
        distributed.init_distributed("cpu", timeout_s=10)


@pytest.mark.parametrize("env, problem", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "0 <= RANK"),
    ({"WORLD_SIZE": "0"}, "0 <= RANK < WORLD_SIZE"),
])
def test_inconsistent_launcher_environment_is_refused(launcher_env, env: dict[str, str],
                                                      problem: str) -> None:
    launcher_env(env)
    with pytest.raises(LaunchError, match=re.escape(problem)):
        launcher_ranks()


@pytest.mark.parametrize("env", [{}, {"MASTER_ADDR": "127.0.0.1"}, {"WORLD_SIZE": "1"}, {"RANK": "0"}])
def test_no_launcher_or_a_world_of_one_runs_alone(launcher_env, env: dict[str, str]) -> None:
    launcher_env(env)
    assert launcher_ranks() == (0, 1, 0)


def test_training_with_world_size_but_no_rank_ends_at_once_naming_rank(synthetic_root: Path, tmp_path: Path) -> None:
    args = ["--config", str(TINY_CONFIG), *tiny_overrides(synthetic_root, tmp_path / "run", "train.workers=0")]
    env = child_env(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    started = time.monotonic()
    # Before the fix it waited for a peer for train.dist_timeout_s (30 min): the timeout fails the test.
    result = run_module("dist_kp.train", args, env=env, timeout=120)
    assert result.returncode != 0 and time.monotonic() - started < 120
    assert "incomplete launcher environment: RANK, LOCAL_RANK not set" in result.stderr, result.stderr[-3000:]


def test_ranks_started_by_hand_on_a_taken_master_port_end_with_messages_within_the_timeout(
        synthetic_root: Path, tmp_path: Path) -> None:
    """Rank 0 names the taken port at once; rank 1, which reaches the other program's socket and waits
    there for an answer that never comes, ends after train.dist_timeout_s with a message."""
    timeout_s = 10
    args = ["--config", str(TINY_CONFIG), *tiny_overrides(synthetic_root, tmp_path / "run", "train.workers=0",
                                                          f"train.dist_timeout_s={timeout_s}")]
    with socket.socket() as other_program:  # listens and accepts, never answers
        other_program.bind(("127.0.0.1", 0))
        other_program.listen()
        port = str(other_program.getsockname()[1])
        ranks = [subprocess.Popen(
            [sys.executable, "-m", "dist_kp.train", *args], cwd=REPO, text=True, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for rank in (0, 1)]
        try:
            # Without the deadline rank 1 waits as long as the other program keeps the connection open.
            logs = [rank.communicate(timeout=timeout_s + 110)[1] for rank in ranks]
        finally:
            for rank in ranks:
                if rank.poll() is None:
                    rank.kill()
                    rank.wait()
    assert ranks[0].returncode == 2, logs[0][-3000:]
    assert f"MASTER_PORT {port} is already in use on this host" in logs[0] and "Traceback" not in logs[0]
    assert ranks[1].returncode == 1, logs[1][-3000:]
    assert (f"rank 1: could not join the process group at 127.0.0.1:{port} within {timeout_s} s "
            "(train.dist_timeout_s)") in logs[1]
