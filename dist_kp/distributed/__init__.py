"""Process group set-up from torchrun's or SLURM's environment, plus the few collectives we use.

A single process with no launcher environment is world size 1 and needs no process group:
every helper here then works locally, so there is no separate non-distributed code path.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import re
import socket
import subprocess
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# What torch's env:// rendezvous needs from a launcher (torchrun sets them all; srun through _env_from_slurm).
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# SLURM jobs derive their rendezvous port from the job id (slurm/train_8gpu.sh has a copy, tested equal).
MASTER_PORT_BASE = 15000
MASTER_PORT_RANGE = 20000


class LaunchError(RuntimeError):
    """The process cannot start as its environment says: an incomplete launcher environment or a missing device."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def master_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job: distinct for concurrent jobs on a node, the same for all of its tasks."""
    return MASTER_PORT_BASE + job_id % MASTER_PORT_RANGE


def _slurm_master_addr() -> str:
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True, timeout=30
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol: {error}") from error
    return hosts[0]


def _env_from_slurm() -> None:
    """Under `srun` (one task per GPU) translate SLURM's variables into torch's env:// ones."""
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _slurm_master_addr()
    os.environ.setdefault("MASTER_PORT", str(master_port(int(os.environ.get("SLURM_JOB_ID", "0")))))


def _launched_by_srun() -> bool:
    return "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ and "RANK" not in os.environ


def cuda_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device of a worker among the `visible` ones: its local rank, or 0 when it was given one device.

    A launcher that narrows CUDA_VISIBLE_DEVICES to one device per task (srun --gpus-per-task=1,
    submitit's export by default) leaves every worker its own GPU as device 0.
    """
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise LaunchError(f"LOCAL_RANK={local_rank} but this process sees {visible} CUDA devices "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
                          "one worker per GPU")
    return local_rank


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """cpu, or this worker's CUDA device (made the current device) for "cuda" and for "auto" on a host with CUDA."""
    # SLURM sets CUDA_VISIBLE_DEVICES even on nodes without GPUs; trust torch, not the env.
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchError(f"device {requested!r} asked for, but torch.cuda.is_available() is False on this host")
    index = cuda_device_index(local_rank, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _torchrun_attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """The agent's store seen through a prefix of this restart attempt, when that is safe.

    torchrun keeps one store for all restarts of its workers (TORCHELASTIC_USE_AGENT_STORE) and
    torch 2.14 no longer separates attempts in it: restarted workers can read the addresses of the
    dead ones and fail to connect. With one agent every worker sees the same restart count, so a
    prefix per attempt isolates them. Several agents count restarts apart; there the launch needs
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (README, multi-node).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        if rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            log.warning("torchrun restarts on several nodes need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the "
                        "environment of every torchrun, or restarted workers may not reconnect")
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"dist_kp/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _int_variable(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"launcher environment: {name}={raw!r} is not an integer") from None


def launcher_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; no launcher: (0, 1, 0).

    An incomplete or inconsistent environment raises LaunchError at once, naming the variables:
    with WORLD_SIZE=2 and no RANK a process would otherwise take rank 0 and wait for a peer
    for train.dist_timeout_s.
    """
    world_size, rank = _int_variable("WORLD_SIZE", 1), _int_variable("RANK", 0)
    local_rank = _int_variable("LOCAL_RANK", 0)
    found = ", ".join(f"{name}={os.environ[name]}" for name in LAUNCHER_VARIABLES if name in os.environ)
    missing = [name for name in LAUNCHER_VARIABLES if not os.environ.get(name)]
    if (world_size > 1 or rank != 0) and missing:
        raise LaunchError(
            f"incomplete launcher environment: {', '.join(missing)} not set ({found}); start the workers with "
            "torchrun or srun, which set them all, or unset WORLD_SIZE and RANK to run one process")
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise LaunchError(f"inconsistent launcher environment: {found} (need 0 <= RANK < WORLD_SIZE, "
                          "LOCAL_RANK >= 0)")
    return rank, world_size, local_rank


@dataclass
class _Collectives:
    """Where this process's collectives stand, for the message when one times out."""

    timeout_s: int = 1800
    step: int | None = None  # the training step in progress, told by the trainer


_COLLECTIVES = _Collectives()
# gloo: "Timed out waiting 30000ms for recv operation"; NCCL's watchdog: "collective operation timeout".
_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)


def training_step(step: int) -> None:
    """The training step whose collectives follow (named when one of them times out)."""
    _COLLECTIVES.step = step


@contextlib.contextmanager
def _collective(name: str) -> Iterator[None]:
    """Name the collective on the error it raises (read by collective_timeout)."""
    try:
        yield
    except RuntimeError as error:
        error.dist_kp_collective = name  # type: ignore[attr-defined]
        raise


def collective_timeout(error: BaseException) -> str | None:
    """The log line for a collective that waited train.dist_timeout_s for a rank that stopped answering.

    None for any other error. The collective is the dist_kp helper that raised, else DDP's
    gradient all_reduce when the error came out of a backward pass.
    """
    if not isinstance(error, RuntimeError) or not _TIMED_OUT.search(str(error)):
        return None
    in_backward = "backward" in [frame.name for frame in traceback.extract_tb(error.__traceback__)]
    name = getattr(error, "dist_kp_collective", None) or ("all_reduce (DDP gradients)" if in_backward else None)
    if name is None and not isinstance(error, dist.DistBackendError):
        return None  # a timeout of something else (a data loader, a file system)
    where = f"at step {_COLLECTIVES.step}" if _COLLECTIVES.step is not None else "before the first training step"
    return (f"rank {get_rank()}: collective {name or 'of the process group'} {where} timed out after "
            f"{_COLLECTIVES.timeout_s} s (a rank stopped answering)")


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the process group described by the environment (torchrun, srun) or run alone.

    Raises LaunchError for an incomplete launcher environment or a device the host lacks.
    """
    if _launched_by_srun():
        _env_from_slurm()
    rank, world_size, local_rank = launcher_ranks()
    _COLLECTIVES.timeout_s = timeout_s
    torch_device = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _torchrun_attempt_store(rank, world_size, timeout)
        dist.init_process_group(
            backend=backend,
            init_method=None if store else "env://",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=torch_device if torch_device.type == "cuda" else None,
        )
        _RANK_HOSTS[:] = all_gather_objects(_host_addresses())
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        with _collective("barrier"):
            dist.barrier()


def _collective_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean of each scalar over all ranks, in one collective. Keys must match on every rank."""
    names = sorted(values)
    stacked = torch.stack([values[n].detach().float().reshape(()) for n in names]).to(_collective_device())
    if is_distributed():
        with _collective("all_reduce"):
            dist.all_reduce(stacked)
        stacked /= get_world_size()
    return dict(zip(names, stacked.tolist()))


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    with _collective("all_reduce"):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's `obj` on rank `dst` (in rank order); None elsewhere."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * get_world_size() if get_rank() == dst else None
    # `dst` keeps its own object as it is: gather_object would pickle and unpickle it too.
    with _collective("gather_object"):
        dist.gather_object(None if out is not None else obj, out, dst=dst)
    if out is not None:
        out[dst] = obj
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    with _collective("all_gather_object"):
        dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    with _collective("broadcast_object_list"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def parameter_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas_identical(model: torch.nn.Module) -> str:
    """Raise unless every rank holds bit-identical weights (DDP replicas must never diverge)."""
    fingerprints = all_gather_objects(parameter_fingerprint(model))
    if len(set(fingerprints)) != 1:
        raise RuntimeError(f"model replicas differ across ranks: {fingerprints}")
    log.info("model replicas identical on %d ranks (sha256 %s)", len(fingerprints), fingerprints[0][:16])
    return fingerprints[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank `src`'s buffers (BatchNorm running stats drift apart after the last forward)."""
    if is_distributed():
        with _collective("broadcast"):
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=src)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


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


def _host_addresses() -> tuple[str, list[str]]:
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
        record.rank = get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))
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
    # Whichever rank wins the node's lock builds the index cache: that one line is logged by any rank.
    logging.getLogger("dist_kp.data.index_cache").setLevel(level)
