"""Process group set-up from torchrun's or SLURM's environment, plus the few collectives we use.

A single process with no launcher environment is world size 1 and needs no process group:
every helper here then works locally, so there is no separate non-distributed code path.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
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


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """cpu, or cuda:local_rank (made the current device) for "cuda" and for "auto" on a host with CUDA."""
    # SLURM sets CUDA_VISIBLE_DEVICES even on nodes without GPUs; trust torch, not the env.
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchError(f"device {requested!r} asked for, but torch.cuda.is_available() is False on this host")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


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


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the process group described by the environment (torchrun, srun) or run alone.

    Raises LaunchError for an incomplete launcher environment or a device the host lacks.
    """
    if _launched_by_srun():
        _env_from_slurm()
    rank, world_size, local_rank = launcher_ranks()
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
        dist.all_reduce(stacked)
        stacked /= get_world_size()
    return dict(zip(names, stacked.tolist()))


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's `obj` on rank `dst` (in rank order); None elsewhere."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * get_world_size() if get_rank() == dst else None
    # `dst` keeps its own object as it is: gather_object would pickle and unpickle it too.
    dist.gather_object(None if out is not None else obj, out, dst=dst)
    if out is not None:
        out[dst] = obj
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank `src`'s buffers (BatchNorm running stats drift apart after the last forward)."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=src)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


class RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))
        return True


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines carry the rank; rank 0 logs INFO, other ranks only warnings and errors."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    handler = logging.StreamHandler()
    handler.addFilter(RankFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s [rank%(rank)s] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else logging.WARNING)
    # Whichever rank wins the node's lock builds the index cache: that one line is logged by any rank.
    logging.getLogger("dist_kp.data.index_cache").setLevel(level)
