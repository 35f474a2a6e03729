"""What a distributed failure says: log lines that carry the rank, lost peers named by rank and host.

A collective that fails because a peer is gone names only the peer's address ("Connection closed
by peer [ip]:port"); with every rank's host gathered at start (`record_rank_hosts`) the logged
error names the rank and host instead (`LostPeerFilter`).
"""

from __future__ import annotations

import logging
import os
import re
import socket

import torch.distributed as dist

# (hostname, addresses) of every rank, gathered when the process group starts: a collective that
# fails because a peer is gone names only the peer's address ("Connection closed by peer [ip]:port").
_RANK_HOSTS: list[tuple[str, list[str]]] = []
_PEER_ADDRESS = re.compile(r"\[([0-9A-Za-z.:%_-]+)\]:\d+")
_PEER_GONE = re.compile(r"by peer|Connection refused|Broken pipe|Connection closed|Socket closed", re.IGNORECASE)


def _interface_address(name: str) -> str | None:
    """IPv4 address of a network interface (GLOO_SOCKET_IFNAME), Linux only."""
    import fcntl
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
        return socket.inet_ntoa(packed[20:24])
    except OSError:
        return None


def host_addresses() -> tuple[str, list[str]]:
    """This host's name and the addresses its peers may know it by (gloo: GLOO_SOCKET_IFNAME's, else the name's)."""
    host = socket.gethostname()
    addresses = set()
    try:
        addresses.update(info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    except OSError:
        pass
    for name in filter(None, os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")):
        addresses.add(_interface_address(name) or "")
    return host, sorted(a for a in addresses if a)


def record_rank_hosts(hosts: list[tuple[str, list[str]]]) -> None:
    """Every rank's (hostname, addresses), gathered when the process group starts (init_distributed)."""
    _RANK_HOSTS[:] = hosts


def lost_peer(error: BaseException) -> str | None:
    """'rank 1 (host hostb, 10.1.2.3) lost ...' for a collective's error that names a gone peer's address."""
    message = str(error)
    match = _PEER_ADDRESS.search(message)
    if not match or not _PEER_GONE.search(message) or not _RANK_HOSTS:
        return None
    address = match.group(1)
    ranks = [rank for rank, (_, addresses) in enumerate(_RANK_HOSTS) if address in addresses]
    if not ranks:
        return f"the peer at {address} is gone (not an address of any rank's host)"
    hosts = sorted({_RANK_HOSTS[rank][0] for rank in ranks})
    return (f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} (host {', '.join(hosts)}, {address}) "
            "lost: its process or node is gone")


class LostPeerFilter(logging.Filter):
    """A logged exception from a collective whose peer is gone also names that peer's rank and host."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and not getattr(record, "lost_peer", None):
            record.lost_peer = lost_peer(record.exc_info[1])
            if record.lost_peer:
                record.msg = f"{record.msg}: {record.lost_peer.replace('%', '%%')}"
        return True


class RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        initialized = dist.is_available() and dist.is_initialized()
        record.rank = dist.get_rank() if initialized else int(os.environ.get("RANK", "0"))
        return True


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines carry the rank; rank 0 logs INFO, other ranks only warnings and errors."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    handler = logging.StreamHandler()
    handler.addFilter(RankFilter())
    handler.addFilter(LostPeerFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s [rank%(rank)s] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else logging.WARNING)
    # Whichever rank wins the node's lock builds the index cache, the others wait for it: those lines are
    # logged by any rank (a rank that waits says why it does not go on).
    logging.getLogger("dist_kp.data.index_cache").setLevel(level)
