"""Shared fixtures: a generated dataset and a way to run the real CLIs (torchrun included)."""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import CompletedProcess
from types import CodeType
from typing import TypeVar

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "synthetic_cpu.yaml"
T = TypeVar("T")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shuffle", metavar="SEED", default=None,
                     help="run the test files in a shuffled order, and the tests of each file shuffled too "
                          "(SEED: a number, or 'random'); proves that no test depends on another having run")


SHUFFLE_SEED = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    seed = config.getoption("--shuffle")
    if seed is None:
        return
    workerinput = getattr(config, "workerinput", None)  # a pytest-xdist worker (launch/test.sh runs several)
    if workerinput is not None and "shuffle_seed" in workerinput:
        config.stash[SHUFFLE_SEED] = workerinput["shuffle_seed"]  # every worker must collect the same order
    else:
        config.stash[SHUFFLE_SEED] = random.randrange(2**32) if seed == "random" else int(seed)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """pytest-xdist starts a worker: it shuffles with the seed this process chose."""
    if SHUFFLE_SEED in node.config.stash:
        node.workerinput["shuffle_seed"] = node.config.stash[SHUFFLE_SEED]


# What a test (or a fixture it uses) calls when it starts another process or a real server.
STARTS_PROCESSES = re.compile(r"\b(run_module|start_module|module_command|subprocess\.|Popen|start_server|"
                              r"start_cluster|start_two_node_cluster|netns)\b|\b(slurm|s3_server|hosts)\b")


def _names(code: CodeType) -> Iterator[str]:
    """The global names a code object and its nested ones (comprehensions, inner functions) refer to."""
    yield from code.co_names
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            yield from _names(constant)


def _called_helpers(function: Callable, seen: set) -> Iterator[Callable | type]:
    """`function` and the functions and classes of the test modules (tests.*) it calls, directly or through
    each other (a test's `run_with_rank1(...)` helper or `Running(...)` class that starts torchrun counts
    as the test's own call)."""
    if function in seen or not inspect.isfunction(function):
        return
    seen.add(function)
    yield function
    for name in _names(function.__code__):
        helper = function.__globals__.get(name)
        if getattr(helper, "__module__", "").split(".")[0] != function.__module__.split(".")[0]:
            continue
        if inspect.isclass(helper) and helper not in seen:
            seen.add(helper)
            yield helper
        elif inspect.isfunction(helper):
            yield from _called_helpers(helper, seen)


def starts_processes(roots: list[Callable]) -> bool:
    """True when these functions (a test and its fixtures), or a helper of the test modules that they call,
    start a process (torchrun, a CLI, SLURM, SeaweedFS, network namespaces): the integration tier."""
    seen: set = set()
    for root in roots:
        for function in _called_helpers(getattr(root, "__wrapped__", root), seen):
            try:
                source = inspect.getsource(function)
            except (OSError, TypeError):
                continue
            if STARTS_PROCESSES.search(source):
                return True
    return False


def _starts_processes(item: pytest.Item) -> bool:
    roots = [getattr(item, "function", None)]
    for definitions in item._fixtureinfo.name2fixturedefs.values():
        roots.extend(definition.func for definition in definitions)
    return starts_processes(roots)


# The test files that start a SLURM cluster (or hosts with one), or look for its processes by their
# environment (a job's SLURM_PROCID, a stopped task): one pytest-xdist worker runs them all, one after
# the other, on one cluster; two clusters' jobs would share ids and ports (MASTER_PORT from the job id).
USES_SLURM = re.compile(r"def test\w*\([^)]*\bslurm\b|\bcreate_hosts\b")


def xdist_scope(nodeid: str) -> str:
    """What one pytest-xdist worker runs as a unit: a test's whole file (its module fixtures are built
    once), or "slurm" for every file that uses a SLURM cluster (see USES_SLURM)."""
    path = nodeid.split("::", 1)[0]
    if _uses_slurm(path):
        return "slurm"
    return path


@functools.cache
def _uses_slurm(path: str) -> bool:
    try:
        return bool(USES_SLURM.search(_test_file_text(path)))
    except OSError:
        return False


@functools.cache
def _test_file_text(path: str) -> str:
    """A test file's source, read once per run (the scheduler's two questions about it share it)."""
    return (REPO / path).read_text()


def longest_first(scopes: list[str]) -> list[str]:
    """xdist scopes in the order the workers take them: the SLURM one (a third of the suite's time), then by
    the process-starting calls in a file (a proxy for its time; ties keep their order). A long file taken
    last leaves the other worker idle at the end: xdist's own order, most tests first, put the README's one
    test of 60 s after the 50 tests of 3 s of test_flip_pairs."""
    return sorted(scopes, key=_process_calls, reverse=True)


@functools.cache
def _process_calls(scope: str) -> float:
    return math.inf if scope == "slurm" else len(STARTS_PROCESSES.findall(_test_file_text(scope)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under `-n N` (launch/test.sh), tests go to the workers a scope of xdist_scope at a time, in the
    order of longest_first. (pytest-xdist's own xdist_group marks cannot be used: they rename the test's
    nodeid, which pytest 9 no longer lets a plugin do.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

        def _assign_work_unit(self, node) -> None:
            # Ordered again at each assignment (40 cached counts): the base class fills the queue, then assigns.
            for scope in longest_first(list(self.workqueue)):
                self.workqueue.move_to_end(scope)
            super()._assign_work_unit(node)

    return FileScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _starts_processes(item):
            item.add_marker(pytest.mark.integration)
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


def pytest_collection_finish(session: pytest.Session) -> None:
    # What collection imported (torch: ~350,000 objects) stays out of the garbage collector's walks in this
    # process, as in dist_kp's command processes (dist_kp.cli.as_process): ~7% less CPU for in-process tests.
    gc.freeze()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if SHUFFLE_SEED in config.stash:
        seed = config.stash[SHUFFLE_SEED]
        terminalreporter.write_line(f"test order shuffled with seed {seed} (the same order again: --shuffle {seed})")


@contextlib.contextmanager
def logging_kept() -> Iterator[None]:
    """A command's main() run in-process (export, evaluate, train) calls setup_logging, which puts a
    handler on this test's captured stderr onto the root logger and sets INFO levels. Left there, a
    later test writes to a closed file and catches INFO records it did not ask for (seen: a test of
    the exact warnings failed after an in-process export). Remove that handler and put the levels back."""
    root = logging.getLogger()
    levels = {name: logger.level for name, logger in logging.Logger.manager.loggerDict.items()
              if isinstance(logger, logging.Logger)}
    root_level = root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if any(type(f).__name__ == "RankFilter" for f in handler.filters):  # distributed.setup_logging's
                root.removeHandler(handler)
                handler.close()
        root.setLevel(root_level)
        for name, logger in logging.Logger.manager.loggerDict.items():
            if isinstance(logger, logging.Logger):
                logger.setLevel(levels.get(name, logging.NOTSET))


@pytest.fixture(autouse=True)
def logging_as_found():
    """Every test leaves logging as it found it (see logging_kept)."""
    with logging_kept():
        yield


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


def train_for_fixture(args: list[str]) -> None:
    """Train with dist_kp.train's main() in this process for a module or session fixture, which is built
    inside its first user's setup, before that test's logging_as_found looks: logging is put back here."""
    from dist_kp.train import main as train_main

    with logging_kept():
        assert train_main(args) == 0, f"training for a fixture failed: {args}"


@pytest.fixture(scope="session")
def tiny_model_final(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model_final.pt of the tiny model trained 20 steps in this process by the training command's main(),
    shared by the files that need some trained weights (evaluation on 1-3 processes, predict)."""
    out = tmp_path_factory.mktemp("tiny_trained")
    train_for_fixture(["--config", str(TINY_CONFIG), *tiny_overrides(
        synthetic_root, out, "train.max_steps=20", "train.workers=0", "eval.every_epochs=0", "eval.at_end=false")])
    return out / "model_final.pt"


# Set by wandb in this process when an in-process test starts a W&B run: a child would join that service.
PROCESS_ONLY = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "WANDB_SERVICE")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(PROCESS_ONLY)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled", **extra)
    return env


@contextlib.contextmanager
def environment(**variables: str) -> Iterator[None]:
    """Set variables in this process's environment for a block, then put back what was there."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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


def main_here(main: Callable[[list[str]], int], args: list[str], capfd: pytest.CaptureFixture) -> CompletedProcess:
    """A command's main() in this process, its exit status and output as a finished child's would be: for
    a one-process run whose process is not what the test is about (it saves the interpreter's start-up).
    Its tests are in the fast tier: STARTS_PROCESSES finds no process-starting call in this source."""
    capfd.readouterr()  # the test's own output so far is not the command's
    status = main(args)
    out, err = capfd.readouterr()
    return CompletedProcess([main.__module__, *args], status, out, err)


def train_here(args: list[str], capfd: pytest.CaptureFixture) -> CompletedProcess:
    """dist_kp.train in this process (see main_here)."""
    from dist_kp.train import main as train_main

    return main_here(train_main, args, capfd)


def check(result: CompletedProcess) -> CompletedProcess:
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


def wait_until(condition: Callable[[], T], what: str, timeout: float = 300,
               process: subprocess.Popen | None = None) -> T:
    """Poll an observable state (a file, a log line, a record) until `condition()` is truthy; return it.

    The timeout only bounds a failure: a test never waits for time to pass instead of a state.
    A process that ends while the state is awaited fails the wait at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            value = condition()  # the state may have come with the process's last output
            if value:
                return value
            raise AssertionError(f"process ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


class LogReader:
    """Reads a started process's stderr in a thread (its pipe never fills) and keeps every line."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        """The first match of `pattern` in the log, once it is there."""
        def found() -> re.Match | None:
            if self.process.poll() is not None:
                self._thread.join(timeout=30)  # the rest of the output of an ended process
            return re.search(pattern, self.text)

        try:
            return wait_until(found, f"{pattern!r} logged", timeout, self.process)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.text[-4000:]}") from None

    def finish(self, timeout: float = 60) -> str:
        """Wait for the process to end; its whole log."""
        self.process.wait(timeout=timeout)
        self._thread.join(timeout=timeout)
        return self.text


def kill_when_held(process: subprocess.Popen, probe: Path, ranks: int, *needles: str,
                   ready: Callable[[], object] | None = None, timeout: float = 300) -> str:
    """SIGKILL a run (every process) that stands still: every rank holds (tests.hook_probe:HoldHook),
    each needle is logged and `ready()` is true. Returns the log.

    Holding first makes the moment of the kill a state, not a race: nothing the test waits for
    (a background save, another program's flush) can be overtaken by the next steps.
    """
    log = LogReader(process)
    try:
        for rank in range(ranks):
            wait_until(lambda: (probe / f"held{rank}").exists(), f"rank {rank} holding", timeout, process)
        for needle in needles:
            log.wait_for(needle, timeout)
        if ready is not None:
            wait_until(ready, "the state the kill waits for", timeout, process)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{log.text[-4000:]}") from None
    finally:
        kill_tree(process.pid, signal.SIGKILL)
    return log.finish()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A one-node SLURM cluster (munged, slurmctld, slurmd) for the session; fails if it cannot start."""
    from tests.slurm_cluster import start_cluster

    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()
