"""A one-node SLURM cluster for the tests, from Debian's slurm-wlm and munge.

The node advertises 16 CPUs and 8 GPUs (count-only, backed by /dev/null links) whatever the
machine has, so the 8-GPU sbatch script can be submitted as users would. Daemons are started
directly (no systemd) and stopped by their PIDs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


class ClusterError(RuntimeError):
    """SLURM could not be started; the message says why."""


def _conf(root: Path, host: str, port: int) -> str:
    return f"""ClusterName=ci
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={port}
SlurmdPort={port + 1}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5,socket={root}/munge/munge.socket.2
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
KillWait=30
ReturnToService=2
MailProg=/bin/true
StateSaveLocation={root}/slurmctld
SlurmdSpoolDir={root}/slurmd
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs=16 Boards=1 SocketsPerBoard=1 CoresPerSocket=16 ThreadsPerCore=1 RealMemory=512000 Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(list(cmd), env={**os.environ, **self.env}, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key -> value (sacct needs accounting, which this cluster lacks)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        fields = {}
        for token in text.split():
            key, _, value = token.partition("=")
            fields[key] = value
        return fields

    def wait_job(self, job_id: str, timeout: float = 600, states: tuple[str, ...] = ("COMPLETED", "FAILED",
                 "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise ClusterError(f"job {job_id} did not finish within {timeout} s: {self.job(job_id)}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()


def _free_port_pair() -> int:
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise ClusterError("no two free consecutive ports for slurmctld/slurmd")


def start_cluster(root: Path) -> SlurmCluster:
    """Write the configuration under `root`, start munged, slurmctld and slurmd; wait for an idle node."""
    for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol"):
        if shutil.which(tool) is None:
            raise ClusterError(f"{tool} not found: install Debian's slurm-wlm and munge (launch/test.sh does)")
    if os.geteuid() != 0:
        raise ClusterError("the test cluster runs its daemons as root (SlurmUser=root); run the tests as root")
    host = socket.gethostname().split(".")[0]
    port = _free_port_pair()
    _lay_out(root, _conf(root, host, port), [host], ("slurmd",))
    cluster = SlurmCluster(root, env={"SLURM_CONF": str(root / "slurm.conf")})
    env = {**os.environ, **cluster.env}
    logs = open(root / "daemons.log", "ab")
    try:
        _start_munged(cluster, env, logs)
        cluster.processes.append(subprocess.Popen(["slurmctld", "-D", "-i"], stdout=logs, stderr=logs, env=env))
        _wait(lambda: cluster.run("scontrol", "ping", check=False).stdout.count("UP") > 0, 30,
              "slurmctld did not answer scontrol ping", root)
        cluster.processes.append(subprocess.Popen(["slurmd", "-D"], stdout=logs, stderr=logs, env=env))
        _wait(lambda: "idle" in cluster.run("sinfo", "-h", "-o", "%t", check=False).stdout, 60,
              "the node did not become idle", root)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _lay_out(root: Path, slurm_conf: str, nodes: list[str], extra_dirs: tuple[str, ...]) -> None:
    """The cluster's folders and config files; eight fake GPUs (links to /dev/null) per node."""
    for sub in ("munge", "slurmctld", "fakegpu", *extra_dirs):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o755)
    for i in range(8):
        link = root / "fakegpu" / f"gpu{i}"
        if not link.exists():
            link.symlink_to("/dev/null")
    (root / "slurm.conf").write_text(slurm_conf)
    (root / "gres.conf").write_text("AutoDetect=off\n" + "".join(
        f"NodeName={node} Name=gpu File={root}/fakegpu/gpu[0-7]\n" for node in nodes))
    (root / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemdOnFailure=yes\n")


def _start_munged(cluster: SlurmCluster, env: dict[str, str], logs) -> None:
    root = cluster.root
    cluster.processes.append(subprocess.Popen(
        ["munged", "--foreground", "--force", f"--socket={root}/munge/munge.socket.2",
         f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/munge.seed",
         f"--log-file={root}/munge/munged.log"], stdout=logs, stderr=logs, env=env))
    _wait(lambda: (root / "munge" / "munge.socket.2").exists(), 20, "munged did not create its socket", root)


def _wait(ready, timeout: float, message: str, root: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except (OSError, subprocess.SubprocessError, ClusterError):
            pass
        time.sleep(0.3)
    logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in
                     [root / "daemons.log", root / "slurmctld.log", root / "slurmd.log", root / "munge" / "munged.log"]
                     if p.exists())
    raise ClusterError(f"{message} within {timeout} s; logs:\n{logs}")


# --- Two nodes: one slurmd in each namespace host of tests/netns_hosts.py, slurmctld on host A. ---

# Inside the hosts' own namespaces nothing else listens: SLURM's default ports.
NETNS_CTLD_PORT = 6817
NETNS_SLURMD_PORT = 6818


def _two_node_conf(root: Path, hosts) -> str:
    """slurm.conf for slurmctld on host A and one node per host (NodeName = the host's hostname)."""
    one_node = _conf(root, hosts.a.hostname, NETNS_CTLD_PORT)
    lines = [line for line in one_node.splitlines() if not line.startswith(("NodeName=", "SlurmctldHost=",
                                                                           "SlurmdPidFile=", "SlurmdLogFile=",
                                                                           "SlurmdSpoolDir="))]
    lines.insert(1, f"SlurmctldHost={hosts.a.hostname}({hosts.a.address})")
    # %n: the node's name, so the two slurmds keep their spool, pid and log files apart.
    lines += [f"SlurmdSpoolDir={root}/slurmd-%n", f"SlurmdPidFile={root}/slurmd-%n.pid",
              f"SlurmdLogFile={root}/slurmd-%n.log"]
    partition = next(i for i, line in enumerate(lines) if line.startswith("PartitionName="))
    for host in hosts.all:
        lines.insert(partition, f"NodeName={host.hostname} NodeAddr={host.address} CPUs=16 Boards=1 SocketsPerBoard=1 "
                                "CoresPerSocket=16 ThreadsPerCore=1 RealMemory=512000 Gres=gpu:8 State=UNKNOWN")
    return "\n".join(lines) + "\n"


@dataclass
class NamespaceSlurmCluster(SlurmCluster):
    """A SLURM cluster whose daemons live in namespace hosts; its commands run on host A (the head node)."""

    hosts: object = None

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = self.hosts.a.run(list(cmd), env={**os.environ, **self.env}, timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def logs(self) -> str:
        paths = [self.root / "daemons.log", self.root / "slurmctld.log", *sorted(self.root.glob("slurmd-*.log"))]
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in paths if p.exists())


def start_two_node_cluster(root: Path, hosts) -> NamespaceSlurmCluster:
    """munged on this machine (its socket is a file both hosts reach), slurmctld and a slurmd on host A,
    a slurmd on host B (`slurmd -N <hostname>`); waits until both nodes are idle."""
    for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol"):
        if shutil.which(tool) is None:
            raise ClusterError(f"{tool} not found: install Debian's slurm-wlm and munge (launch/test.sh does)")
    _lay_out(root, _two_node_conf(root, hosts), [host.hostname for host in hosts.all], ())
    cluster = NamespaceSlurmCluster(root, env={"SLURM_CONF": str(root / "slurm.conf")}, hosts=hosts)
    env = {**os.environ, **cluster.env}
    logs = open(root / "daemons.log", "ab")
    try:
        _start_munged(cluster, env, logs)
        cluster.processes.append(hosts.a.popen(["slurmctld", "-D", "-i"], env=env, stdout=logs, stderr=logs))
        _wait(lambda: cluster.run("scontrol", "ping", check=False).stdout.count("UP") > 0, 30,
              "slurmctld did not answer scontrol ping", root)
        for host in hosts.all:
            (root / f"slurmd-{host.hostname}").mkdir(exist_ok=True)
            cluster.processes.append(host.popen(["slurmd", "-D", "-N", host.hostname], env=env, stdout=logs,
                                                stderr=logs))
        _wait(lambda: cluster.run("sinfo", "-h", "-o", "%t %D", check=False).stdout.split() == ["idle", "2"], 60,
              "the two nodes did not become idle", root)
    except BaseException as error:
        cluster.stop()
        if isinstance(error, ClusterError):
            raise ClusterError(f"{error}\n{cluster.logs()}") from None
        raise
    return cluster
