"""The process group and the few collectives dist_kp uses; launch environment, diagnostics and
preemption in this folder's other modules (their public names are re-exported here).

    from dist_kp import distributed
    info = distributed.init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    distributed.is_main_process(), distributed.all_reduce_mean({...}), distributed.gather_objects(x)

A single process with no launcher environment is world size 1 and needs no process group:
every helper here then works locally, so there is no separate non-distributed code path.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist_kp.distributed.agreement import Fact, RanksDisagree, check_agreement
from dist_kp.distributed.diagnostics import (
    LostPeerFilter,
    RankFilter,
    host_addresses,
    lost_peer,
    record_rank_hosts,
    setup_logging,
)
from dist_kp.distributed.launch import (
    LAUNCHER_VARIABLES,
    DistInfo,
    LaunchError,
    cuda_device_index,
    env_from_slurm,
    launched_by_srun,
    launcher_ranks,
    master_port,
    pick_device,
    torchrun_attempt_store,
)

__all__ = [  # the re-exported names: `distributed.X` reads as one namespace
    "LAUNCHER_VARIABLES", "DistInfo", "LaunchError", "LostPeerFilter", "RankFilter", "RanksDisagree",
    "cuda_device_index", "env_from_slurm", "launcher_ranks", "lost_peer", "master_port", "pick_device", "setup_logging",
]

log = logging.getLogger(__name__)


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

    None for any other error. The collective is the dist_kp helper that raised, else DDP's: the
    gradient all_reduce of a backward pass, or the buffer broadcast (BatchNorm statistics) that
    starts a forward pass (where a stopped rank is noticed depends on when it stopped).
    """
    if not isinstance(error, RuntimeError) or not _TIMED_OUT.search(str(error)):
        return None
    frames = {frame.name for frame in traceback.extract_tb(error.__traceback__)}
    name = getattr(error, "dist_kp_collective", None)
    if name is None and "backward" in frames:
        name = "all_reduce (DDP gradients)"
    elif name is None and "_sync_buffers" in frames:
        name = "broadcast (DDP buffers, before the forward pass)"
    if name is None and not isinstance(error, dist.DistBackendError):
        return None  # a timeout of something else (a data loader, a file system)
    where = f"at step {_COLLECTIVES.step}" if _COLLECTIVES.step is not None else "before the first training step"
    return (f"rank {get_rank()}: collective {name or 'of the process group'} {where} timed out after "
            f"{_COLLECTIVES.timeout_s} s (a rank stopped answering)")


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the process group described by the environment (torchrun, srun) or run alone.

    Raises LaunchError for an incomplete launcher environment or a device the host lacks.
    """
    if launched_by_srun():
        env_from_slurm()
    rank, world_size, local_rank = launcher_ranks()
    _COLLECTIVES.timeout_s = timeout_s
    torch_device = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        with _rendezvous_deadline(rank, timeout_s):
            try:
                store = torchrun_attempt_store(rank, world_size, timeout)
                dist.init_process_group(
                    backend=backend,
                    init_method=None if store else "env://",
                    store=store,
                    rank=rank,
                    world_size=world_size,
                    timeout=timeout,
                    device_id=torch_device if torch_device.type == "cuda" else None,
                )
            except dist.DistNetworkError as error:
                if "EADDRINUSE" not in str(error):
                    raise
                raise LaunchError(
                    f"MASTER_PORT {os.environ.get('MASTER_PORT')} is already in use on this host "
                    f"(MASTER_ADDR {os.environ.get('MASTER_ADDR')}): another run or program listens there. Choose a "
                    "free port (MASTER_PORT=..., torchrun --master-port, or --rdzv-endpoint HOST:PORT)"
                ) from None
        record_rank_hosts(all_gather_objects(host_addresses()))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


@contextlib.contextmanager
def _rendezvous_deadline(rank: int, timeout_s: int) -> Iterator[None]:
    """End this process with a message if joining the process group takes longer than the collective timeout.

    A rank that reaches a MASTER_PORT held by another program (or a rank 0 that never started)
    waits inside torch's store client for an answer that never comes, whatever the timeout.
    """
    def give_up() -> None:
        log.error("rank %d: could not join the process group at %s:%s within %d s (train.dist_timeout_s): rank 0 "
                  "did not start, failed, or MASTER_PORT is used by another program there", rank,
                  os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), timeout_s)
        logging.shutdown()
        os._exit(1)

    deadline = threading.Timer(timeout_s, give_up)
    deadline.daemon = True
    deadline.start()
    try:
        yield
    finally:
        deadline.cancel()


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


def check_ranks_agree(fingerprint: dict[str, Fact]) -> None:
    """Compare every rank's fingerprint (see distributed.agreement) in one collective.

    Raises RanksDisagree on every rank alike, naming the keys that differ and the ranks, before a
    differing batch size or model can end in a collective mismatch or diverging replicas.
    """
    check_agreement(all_gather_objects(fingerprint))


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank `src`'s buffers (BatchNorm running stats drift apart after the last forward)."""
    if is_distributed():
        with _collective("broadcast"):
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=src)


# How long cleanup waits for gloo's threads after destroying the process group (normally: not at all).
GLOO_LINGER_S = 10.0


def cleanup() -> None:
    """Destroy the process group and its threads while the interpreter is fully alive.

    DDP sits in reference cycles (module, reducer, hooks) and holds the process group: until the
    cycle is collected the gloo worker threads live on into interpreter shutdown, where one that
    drops the last reference to a tensor needs the GIL and aborts the process ("terminate called
    without an active exception", exit -6 after a finished run). Collecting first frees them here.
    An exception on its way out (a collective that timed out, a lost peer) holds every frame it
    passed through, DDP and the process group among their variables: those frames are cleared
    first (its traceback still prints), or the threads would outlive the destroy. A gloo thread
    still there after the destroy is waited for (up to GLOO_LINGER_S), then named in a warning.
    """
    if not is_distributed():
        return
    in_flight = sys.exc_info()[1]
    if in_flight is not None:
        traceback.clear_frames(in_flight.__traceback__)
        del in_flight
    rank = get_rank()
    gc.collect()
    dist.destroy_process_group()
    deadline = time.monotonic() + GLOO_LINGER_S
    while (left := gloo_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        log.warning("rank %d: gloo threads %s outlived the process group by %g s", rank, ",".join(left),
                    GLOO_LINGER_S)


def thread_names() -> list[str]:
    """Names of this process's threads, Python's and native ones (Linux: /proc/self/task), sorted."""
    names = []
    for task in Path("/proc/self/task").glob("*/comm"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names.append(task.read_text().strip())
    return sorted(names)


def gloo_threads(names: list[str] | None = None) -> list[str]:
    """The gloo threads among `names` (default: this process's threads now), which end with the process group."""
    return [name for name in (thread_names() if names is None else names) if name.startswith(("gloo", "pt_gloo"))]


