"""The launcher's environment: rank, world size and device from torchrun or srun, the rendezvous address.

Under torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Under srun without
torchrun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the first host of SLURM_JOB_NODELIST
(`env_from_slurm`). CPU or CUDA comes from torch, never from SLURM's variables.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The process cannot start as its environment says: an incomplete launcher environment or a missing device."""


# What torch's env:// rendezvous needs from a launcher (torchrun sets them all; srun through env_from_slurm).
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# SLURM jobs derive their rendezvous port from the job id (slurm/train_8gpu.sh has a copy, tested equal).
MASTER_PORT_BASE = 15000
MASTER_PORT_RANGE = 20000


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


def env_from_slurm() -> None:
    """Under `srun` (one task per GPU) translate SLURM's variables into torch's env:// ones."""
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _slurm_master_addr()
    os.environ.setdefault("MASTER_PORT", str(master_port(int(os.environ.get("SLURM_JOB_ID", "0")))))


def launched_by_srun() -> bool:
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


def torchrun_attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
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
