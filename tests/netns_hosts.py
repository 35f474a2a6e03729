"""Two "hosts" on this machine for multi-node tests: network namespaces of the test's own.

    hosts = create_hosts("t")          # namespaces dkp-<pid>-t-a / -b, a veth pair between them
    proc = hosts.a.popen([...], env)   # runs inside host A, hostname hosts.a.hostname
    hosts.close()                      # ends what still runs in them, deletes them

Each host is a namespace created with `ip netns add`, with its loopback up and one end of a
veth pair, named dkp0 in both, addressed 10.213.7.1/24 (A) and 10.213.7.2/24 (B). Those
addresses exist only inside these two namespaces (other tests' namespaces may reuse them: they
never see each other), so traffic stays inside. Commands run through
`nsenter --net=/run/netns/NS unshare --mount --uts`: each host has its own hostname and a mount
namespace of its own where /etc/netns/NS/hosts is bound over /etc/hosts (what `ip netns exec`
does, without its remount of /sys, which hides the cgroup file systems slurmd needs). That file
names both hosts, so `hosta-...` resolves to A's address on either host (torchrun's rendezvous
advertises hostnames; SLURM's nodes are hostnames). Files are shared: both hosts see the
machine's file system, as nodes see a shared file system.

Everything is removed by close(): the processes still running in the namespaces (found with
`ip netns pids`, so only processes started in them), the namespaces (which removes the veth
pair) and the /etc/netns/NS folders.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.213.7"
# The veth end's name inside either host: the same on both, so one GLOO_SOCKET_IFNAME serves every
# node (an sbatch job's environment is the submitter's, the same on all nodes, as on clusters).
IFNAME = "dkp0"
ETC_NETNS = Path("/etc/netns")


class NetnsError(RuntimeError):
    """The namespaces could not be made; the message says which command failed and how."""


def unavailable_reason() -> str | None:
    """Why namespace hosts cannot be made here (None when they can): not root, or no `ip netns`/`unshare`."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); CI runs the tests as root"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not found (iproute2 / util-linux)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns is unavailable: {probe.stderr.strip()}"
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")


@dataclass
class Host:
    netns: str
    hostname: str
    address: str
    ifname: str
    started: list[subprocess.Popen] = field(default_factory=list)

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host, with its hostname (nsenter, unshare and sh exec: the pid is argv's)."""
        # Not `ip netns exec`: it remounts /sys for the namespace, which hides /sys/fs/cgroup (slurmd needs it).
        # A mount namespace of its own binds this host's hosts file over /etc/hosts, as `ip netns exec` would.
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts", "sh", "-c",
                'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"',
                str(ETC_NETNS / self.netns / "hosts"), self.hostname, *argv]

    def popen(self, argv: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("start_new_session", True)
        process = subprocess.Popen(self.command(argv), env=env, **kwargs)
        self.started.append(process)
        return process

    def run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(argv), env=env, timeout=timeout, **kwargs)

    def pids(self) -> list[int]:
        """Processes inside this host's namespace (all started there by the test)."""
        result = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True)
        return [int(p) for p in result.stdout.split()] if result.returncode == 0 else []

    def kill_all(self, sig: int = signal.SIGKILL, timeout: float = 10) -> None:
        """End every process in this host (they are the test's: the namespace is the test's)."""
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        for process in self.started:
            if process.poll() is None:
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        self.started.clear()


@dataclass
class Hosts:
    a: Host
    b: Host

    @property
    def all(self) -> tuple[Host, Host]:
        return self.a, self.b

    def close(self) -> None:
        errors = []
        for host in self.all:
            try:
                host.kill_all()
            except Exception as error:  # noqa: BLE001 - go on removing the rest
                errors.append(f"{host.netns}: {error}")
        for host in self.all:
            _delete_netns(host.netns, errors)
        if errors:
            raise NetnsError("; ".join(errors))


def _delete_netns(name: str, errors: list[str] | None = None) -> None:
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    if name in existing:
        result = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
        if result.returncode != 0 and errors is not None:
            errors.append(f"ip netns del {name}: {result.stderr.strip()}")
    shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
    try:
        ETC_NETNS.rmdir()  # only when no one else keeps files there
    except OSError:
        pass


def create_hosts(tag: str = "h") -> Hosts:
    """Two namespace hosts joined by a veth pair; on any failure what was made is removed again."""
    reason = unavailable_reason()
    if reason:
        raise NetnsError(reason)
    pid = os.getpid()
    base = f"dkp-{pid}-{tag}"
    short = f"dkp{pid % 100000}{tag[:2]}"  # interface names: at most 15 characters
    a = Host(f"{base}-a", f"hosta-{pid}{tag}", f"{SUBNET}.1", IFNAME)
    b = Host(f"{base}-b", f"hostb-{pid}{tag}", f"{SUBNET}.2", IFNAME)
    machine_ends = (f"{short}a", f"{short}b")  # unique names while the ends are in the machine's namespace
    hosts = Hosts(a, b)
    hosts_file = (f"127.0.0.1 localhost\n::1 localhost\n"
                  f"{a.address} {a.hostname}\n{b.address} {b.hostname}\n")
    try:
        for host in hosts.all:
            _ip("netns", "add", host.netns)
            (ETC_NETNS / host.netns).mkdir(parents=True, exist_ok=True)
            (ETC_NETNS / host.netns / "hosts").write_text(hosts_file)
        _ip("link", "add", machine_ends[0], "type", "veth", "peer", "name", machine_ends[1])
        for host, end in zip(hosts.all, machine_ends):
            _ip("link", "set", end, "netns", host.netns)
            _ip("-n", host.netns, "link", "set", end, "name", host.ifname)
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", host.ifname)
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "link", "set", host.ifname, "up")
        for host, other in ((a, b), (b, a)):
            seen = host.run(["python3", "-c", f"import socket; print(socket.gethostname(), "
                                              f"socket.gethostbyname({other.hostname!r}))"])
            if seen.stdout.split() != [host.hostname, other.address]:
                raise NetnsError(f"host {host.hostname} does not see itself and {other.hostname} at "
                                 f"{other.address}: {seen.stdout.strip()} {seen.stderr.strip()}")
    except BaseException:
        for host in hosts.all:
            _delete_netns(host.netns)
        # A veth end not yet moved into a namespace is still in the machine's: remove it (it is ours).
        subprocess.run(["ip", "link", "del", machine_ends[0]], capture_output=True)
        raise
    return hosts
