"""Two nodes on this machine: torchrun across two namespace hosts, node loss, and a two-node SLURM.

The hosts are network namespaces of this module (tests/netns_hosts.py: a veth pair, 10.213.7.1
and .2, each host its own hostname); only they and 127.0.0.1 are ever addressed. Both see the
same files, as nodes see a shared file system: the runs' output folders are shared.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_CONFIG, check, child_env, descendants, kill_tree, run_module, tiny_overrides
from tests.netns_hosts import Host, Hosts, create_hosts, unavailable_reason

# CI runs as root with iproute2: the two-host tests must run there, never be skipped.
assert unavailable_reason() is None, f"namespace hosts unavailable: {unavailable_reason()}"

STEPS = 10
TRAIN = (f"train.max_steps={STEPS}", "checkpoint.every_steps=2", "eval.every_epochs=0", "eval.at_end=false",
         "train.workers=0")
# A dead node leaves the rendezvous after keep_alive_interval * keep_alive_max_attempt s (5 * 3 by default).
RDZV_CONF = "keep_alive_interval=1,keep_alive_max_attempt=3"
# The collective timeout of the node-loss runs: a survivor that waited for it would fail the bound below.
DIST_TIMEOUT_S = 300
IDENTICAL = re.compile(r"model replicas identical on 2 ranks \(sha256 (\w+)\)")


def torchrun_command(hosts: Hosts, rdzv_id: str, port: int, max_restarts: int, *extra: str,
                     rdzv_conf: str = RDZV_CONF) -> list[str]:
    """The multi-node command of the README, one worker per host, rendezvous on host A (bench/ uses it too)."""
    conf = [f"--rdzv-conf={rdzv_conf}"] if rdzv_conf else []
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={hosts.a.address}:{port}", f"--rdzv-id={rdzv_id}", *conf,
            f"--max-restarts={max_restarts}", "-m", "dist_kp.train", "--config", str(TINY_CONFIG), *extra]


def start_torchrun(host: Host, command: list[str], log: Path) -> subprocess.Popen:
    env = child_env(GLOO_SOCKET_IFNAME=host.ifname, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    with open(log, "a") as sink:
        return host.popen(command, env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)


def read(*logs: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in logs if p.exists())


def wait_for(pattern: str, *logs: Path, timeout: float = 180, processes: tuple[subprocess.Popen, ...] = ()) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = read(*logs)
        if re.search(pattern, text):
            return text
        if processes and all(p.poll() is not None for p in processes):
            break
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not logged within {timeout} s:\n{read(*logs)[-4000:]}")


def worker_rank(agent: subprocess.Popen) -> int:
    """The global rank of the one worker below a torchrun agent (from its environment)."""
    for pid in descendants(agent.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"dist_kp.train" in cmdline:
            for entry in environ:
                if entry.startswith(b"RANK="):
                    return int(entry[5:])
    raise AssertionError(f"no dist_kp.train worker below torchrun {agent.pid}")


def wait_all(processes: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_tree(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError(f"torchrun {process.pid} still running after {timeout} s") from None
    return [p.returncode for p in processes]


def final_weights(out: Path) -> dict:
    return torch.load(out / "model_final.pt", weights_only=True)["model"]


def assert_same_weights(expected: Path, got: Path) -> None:
    a, b = final_weights(expected), final_weights(got)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def hosts():
    made = create_hosts("m")
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def one_host(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The reference: one host, torchrun --nproc_per_node=2 (the same world size), uninterrupted."""
    out = tmp_path_factory.mktemp("one_host") / "run"
    log = check(run_module("dist_kp.train", ["--config", str(TINY_CONFIG),
                                             *tiny_overrides(synthetic_root, out, *TRAIN)], nproc=2)).stderr
    return out, IDENTICAL.search(log).group(1)


_ports = iter(range(29400, 29500))


def test_two_hosts_one_worker_each_end_bit_identical_to_one_host_with_two(hosts: Hosts, one_host, synthetic_root: Path,
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = torchrun_command(hosts, "two", next(_ports), 0, *tiny_overrides(synthetic_root, out, *TRAIN))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    agents = [start_torchrun(host, command, log) for host, log in zip(hosts.all, logs)]
    assert wait_all(agents, timeout=180) == [0, 0], read(*logs)[-4000:]
    text = read(*logs)
    assert "world size 2" in text and f"training finished at step {STEPS}" in text
    assert IDENTICAL.search(text).group(1) == one_host[1]
    assert_same_weights(one_host[0], out)


def test_a_lost_host_comes_back_and_the_job_restarts_resumes_and_ends_identical(
        hosts: Hosts, one_host, synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = torchrun_command(hosts, "restart", next(_ports), 3,
                               *tiny_overrides(synthetic_root, out, *TRAIN, f"train.dist_timeout_s={DIST_TIMEOUT_S}"))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a, b = (start_torchrun(host, command, log) for host, log in zip(hosts.all, logs))
    wait_for(r"\] step 5 ", *logs, processes=(a, b))
    kill_tree(b.pid, signal.SIGKILL)  # host B is lost: its agent and its worker
    b.wait(timeout=30)
    before = read(*logs)
    saved_before = [int(s) for s in re.findall(r"checkpoint step (\d+) saved", before)]
    b = start_torchrun(hosts.b, command, tmp_path / "b2.log")  # the host comes back: the same command
    logs.append(tmp_path / "b2.log")
    assert wait_all([a, b], timeout=180) == [0, 0], read(*logs)[-4000:]
    text = read(*logs)
    resumed = re.findall(r"resumed from .*step_(\d{8}) at step (\d+)", text)
    assert len(resumed) == 1, text[-4000:]
    step = int(resumed[0][1])
    # The newest checkpoint: at least the newest one stored before the kill, never one after it.
    assert saved_before and max(saved_before) <= step <= 6, (saved_before, step)
    assert f"training finished at step {STEPS}" in text
    assert metric_steps(out) == list(range(1, STEPS + 1))
    assert IDENTICAL.search(text[text.index("resumed from"):]).group(1) == one_host[1]
    assert_same_weights(one_host[0], out)


@pytest.mark.parametrize("lost", ["host", "workers"])
def test_without_restarts_a_lost_host_ends_the_job_on_both_hosts_naming_the_rank(
        hosts: Hosts, synthetic_root: Path, tmp_path: Path, lost: str) -> None:
    """lost=host: host B's agent and worker are SIGKILLed; lost=workers: only its worker (the agent reports it)."""
    out = tmp_path / "run"
    command = torchrun_command(hosts, f"norestart-{lost}", next(_ports), 0,
                               *tiny_overrides(synthetic_root, out, *TRAIN, f"train.dist_timeout_s={DIST_TIMEOUT_S}"))
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a, b = (start_torchrun(host, command, log) for host, log in zip(hosts.all, logs))
    wait_for(r"\] step 3 ", *logs, processes=(a, b))
    lost_rank = worker_rank(b)
    if lost == "host":
        kill_tree(b.pid, signal.SIGKILL)
    else:
        for pid in descendants(b.pid):
            kill_tree(pid, signal.SIGKILL)
    killed = time.monotonic()
    codes = wait_all([a, b], timeout=120)
    ended = time.monotonic() - killed
    text = read(*logs)
    assert codes[0] != 0 and codes[1] != 0, (codes, text[-4000:])
    assert codes[1] == (-signal.SIGKILL if lost == "host" else 1), codes
    # Bounded: the survivor notices the closed connection, not the collective timeout.
    assert ended < DIST_TIMEOUT_S / 5, ended
    survivor = read(logs[0])
    assert f"rank {lost_rank} (host {hosts.b.hostname}, {hosts.b.address}) lost" in survivor, survivor[-4000:]
    if lost == "workers":
        agent_b = read(logs[1])
        assert re.search(rf"rank\s*:\s*{lost_rank} \(local_rank: 0\)", agent_b), agent_b[-3000:]
        assert "Signal 9 (SIGKILL)" in agent_b, agent_b[-3000:]
    assert "training finished" not in text


def test_slurm_two_nodes_train_requeue_on_usr1_and_end_identical(hosts: Hosts, one_host, synthetic_root: Path,
                                                                 tmp_path: Path) -> None:
    from tests.slurm_cluster import start_two_node_cluster

    # slurmstepd's socket paths under the spool folder must stay below 108 characters: not under tmp_path.
    root = Path(tempfile.mkdtemp(prefix="dkp-slurm-"))
    try:
        cluster = start_two_node_cluster(root, hosts)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        out, workdir = tmp_path / "run", tmp_path / "job"
        workdir.mkdir()
        job_id = cluster.run(
            "sbatch", "--parsable", f"--chdir={workdir}", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
            f"--export=ALL,PYTHON={sys.executable},OMP_NUM_THREADS=1,GLOO_SOCKET_IFNAME={hosts.a.ifname}",
            str(REPO / "slurm" / "train_8gpu.sh"), str(TINY_CONFIG), *tiny_overrides(synthetic_root, out, *TRAIN)
        ).stdout.strip().split(";")[0]
        job_log = workdir / f"dist_kp-{job_id}.log"
        wait_for(r"\] step 5 ", job_log, timeout=180)
        cluster.run("scancel", "--signal=USR1", job_id)
        wait_for(r"restart count 1", job_log, timeout=120)
        info = cluster.wait_job(job_id, timeout=180)
        text = read(job_log)
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-4000:]
        nodes = f"{hosts.a.hostname},{hosts.b.hostname}"
        assert info["NodeList"] == nodes
        port = 15000 + int(job_id) % 20000
        assert f"on {nodes}: 2 workers, master {hosts.a.hostname}:{port}" in text, text[:2000]
        saved = int(re.findall(r"checkpoint step (\d+) saved", text.split("restart count 1")[0])[-1])
        assert re.search(r"stopped by SIGUSR1: checkpoint saved, SLURM job \d+ requeued", text), text[-4000:]
        assert re.search(rf"resumed from .*step_{saved:08d} at step {saved} ", text), text[-4000:]
        assert metric_steps(out) == list(range(1, STEPS + 1))
        assert IDENTICAL.findall(text)[-1] == one_host[1]
        assert_same_weights(one_host[0], out)
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
