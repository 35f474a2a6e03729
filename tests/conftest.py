"""Shared fixtures: a generated dataset and a way to run the real CLIs (torchrun included)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "synthetic_cpu.yaml"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shuffle", metavar="SEED", default=None,
                     help="run the test files in a shuffled order, and the tests of each file shuffled too "
                          "(SEED: a number, or 'random'); proves that no test depends on another having run")


SHUFFLE_SEED = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    seed = config.getoption("--shuffle")
    if seed is not None:
        config.stash[SHUFFLE_SEED] = random.randrange(2**32) if seed == "random" else int(seed)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if SHUFFLE_SEED not in config.stash:
        return
    rng = random.Random(config.stash[SHUFFLE_SEED])
    # Whole files stay together, so that module-scoped fixtures are built once each.
    by_file: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_file.setdefault(str(item.path), []).append(item)
    files = list(by_file.values())
    rng.shuffle(files)
    for tests in files:
        rng.shuffle(tests)
    items[:] = [item for tests in files for item in tests]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if SHUFFLE_SEED in config.stash:
        seed = config.stash[SHUFFLE_SEED]
        terminalreporter.write_line(f"test order shuffled with seed {seed} (the same order again: --shuffle {seed})")


@pytest.fixture(autouse=True)
def no_wandb_left_behind():
    """An in-process W&B run leaves a service and its settings in this process: end them after each test."""
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated COCO person-keypoints dataset (shared by the whole session)."""
    from dist_kp.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic"), train=48, val=16, seed=0)


def tiny_overrides(data_root: Path, output_dir: str | Path, *extra: str) -> list[str]:
    """Overrides that make the tiny config run in seconds on the test dataset."""
    return [f"data.root={data_root}", f"output_dir={output_dir}", "train.log_every=1", *extra]


# Set by wandb in this process when an in-process test starts a W&B run: a child would join that service.
PROCESS_ONLY = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "WANDB_SERVICE")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(PROCESS_ONLY)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled", **extra)
    return env


def module_command(module: str, args: list[str], nproc: int = 1, torchrun_args: tuple[str, ...] = ()) -> list[str]:
    """`python -m module args` alone (nproc=1) or under torchrun with nproc processes."""
    if nproc == 1 and not torchrun_args:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *torchrun_args, "-m", module, *args]


def run_module(module: str, args: list[str], nproc: int = 1, timeout: float = 600, env: dict | None = None,
               torchrun_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run a module to completion (see module_command), capturing its output."""
    return subprocess.run(module_command(module, args, nproc, torchrun_args), cwd=REPO, env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-8000:]}"
    return result


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """SeaweedFS on 127.0.0.1 for the whole session (stopped by its PID at the end)."""
    from tests.s3_server import start_server

    server = start_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


def start_module(module: str, args: list[str], nproc: int = 1, env: dict | None = None) -> subprocess.Popen:
    """Start a module (see module_command) in its own session, its log readable from stderr."""
    return subprocess.Popen(module_command(module, args, nproc), cwd=REPO, env=env or child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int, sig: int) -> None:
    """Send `sig` to a process and all its descendants, the way a node failure would."""
    for target in [pid, *descendants(pid)]:
        try:
            os.kill(target, sig)
        except ProcessLookupError:
            pass


def kill_when_logged(process: subprocess.Popen, needle: str, timeout: float = 300) -> str:
    """SIGKILL the process and all its descendants once `needle` is logged; returns the log so far."""
    import re
    import signal
    import time

    lines = []
    deadline = time.monotonic() + timeout
    pattern = re.compile(needle)
    for line in process.stderr:
        lines.append(line)
        if pattern.search(line):
            kill_tree(process.pid, signal.SIGKILL)
            break
        if time.monotonic() > deadline:
            kill_tree(process.pid, signal.SIGKILL)
            raise AssertionError(f"{needle!r} not logged within {timeout} s:\n{''.join(lines)[-3000:]}")
    process.wait(timeout=60)
    text = "".join(lines)
    assert pattern.search(text), f"process ended before logging {needle!r}:\n{text[-4000:]}"
    return text


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A one-node SLURM cluster (munged, slurmctld, slurmd) for the session; fails if it cannot start."""
    from tests.slurm_cluster import start_cluster

    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()
