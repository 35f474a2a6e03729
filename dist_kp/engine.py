"""The training step loop: one function per loop, as in torchvision's reference engine."""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dist_kp import distributed
from dist_kp.config import Config, ScheduleConfig

log = logging.getLogger(__name__)


@dataclass
class TrainProgress:
    """Where training stands: `batch` batches of `epoch` are done, `step` optimizer steps in all."""

    epoch: int = 0
    batch: int = 0
    step: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite on some rank; every rank raises it at the same step."""


def lr_factor(step: int, schedule: ScheduleConfig, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the base lr after `step` optimizer steps: linear warmup, then multistep or cosine."""
    factor = 1.0
    if step < schedule.warmup_iters:
        alpha = step / schedule.warmup_iters
        factor = schedule.warmup_factor * (1 - alpha) + alpha
    if schedule.name == "multistep":
        passed = sum(1 for m in schedule.milestones if step >= m * steps_per_epoch)
        return factor * schedule.gamma**passed
    return factor * 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule; a pure function of the step, so resuming restores it exactly."""
    total = cfg.train.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.schedule, steps_per_epoch, total)
    )


class SmoothedValue:
    """A window median/mean and the global average of a series."""

    def __init__(self, window: int = 20) -> None:
        self.window: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float) -> None:
        self.window.append(value)
        self.total += value
        self.count += 1

    @property
    def latest(self) -> float:
        return self.window[-1] if self.window else 0.0

    @property
    def smoothed(self) -> float:
        return sum(self.window) / max(len(self.window), 1)

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)


def to_device(
    images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """uint8 images go to the device as they are and become float [0, 1] there."""
    non_blocking = device.type == "cuda"
    images = [img.to(device, non_blocking=non_blocking).float().div_(255.0) for img in images]
    targets = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in targets]
    return images, targets


def _check_finite(losses: dict[str, torch.Tensor], reduced: dict[str, float], progress: TrainProgress) -> None:
    local_bad = {k: v.item() for k, v in losses.items() if not math.isfinite(v.item())}
    if local_bad:
        log.error("non-finite loss on rank %d at step %d: %s", distributed.get_rank(), progress.step, local_bad)
    if not all(math.isfinite(v) for v in reduced.values()):
        raise NonFiniteLossError(
            f"non-finite loss at step {progress.step} (epoch {progress.epoch}, batch {progress.batch}); "
            f"mean over ranks: {reduced}; the failing rank logged its own values"
        )


StepHook = Callable[[TrainProgress], bool]


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: Iterable,
    progress: TrainProgress,
    cfg: Config,
    device: torch.device,
    scaler: torch.amp.GradScaler,
    record: Callable[[dict], None],
    after_step: StepHook,
) -> bool:
    """Train until the loader is exhausted, max_steps is reached, or `after_step` returns True.

    Returns True when training should stop (max_steps or a stop request), False at the end of
    the epoch. On return every rank holds rank 0's buffers (BatchNorm statistics), so that
    evaluation and checkpoints see one model. Loss terms are all-reduced every step: one small collective that also tells
    every rank when any rank's loss stopped being finite.
    """
    model.train()
    world_size = distributed.get_world_size()
    meters: dict[str, SmoothedValue] = {}
    data_time, step_time = SmoothedValue(), SmoothedValue()
    steps_in_epoch = progress.batch + len(loader)
    start = time.perf_counter()
    end = time.perf_counter()
    skipped_total = 0
    for images, targets, skipped in loader:
        data_time.update(time.perf_counter() - end)
        skipped_total += skipped
        images, targets = to_device(images, targets, device)
        with torch.autocast(device_type=device.type, enabled=scaler.is_enabled()):
            losses = model(images, targets)
        loss = sum(losses.values())
        reduced = distributed.all_reduce_mean({**losses, "loss": loss})
        _check_finite(losses, reduced, progress)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.optim.clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        progress.batch += 1
        progress.step += 1

        for name, value in reduced.items():
            meters.setdefault(name, SmoothedValue()).update(value)
        step_time.update(time.perf_counter() - end)
        if progress.step % cfg.train.log_every == 0 or progress.batch == steps_in_epoch:
            _log_step(progress, meters, data_time, step_time, optimizer, cfg, steps_in_epoch, world_size, record,
                      device, skipped_total)
        stop = after_step(progress)
        if stop or (cfg.train.max_steps is not None and progress.step >= cfg.train.max_steps):
            distributed.broadcast_buffers(model)
            return True
        end = time.perf_counter()
    distributed.broadcast_buffers(model)
    log.info("epoch %d done in %s", progress.epoch, datetime.timedelta(seconds=int(time.perf_counter() - start)))
    return False


def parameter_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas_identical(model: nn.Module) -> str:
    """Raise unless every rank holds bit-identical weights (DDP replicas must never diverge)."""
    fingerprints = distributed.all_gather_objects(parameter_fingerprint(model))
    if len(set(fingerprints)) != 1:
        raise RuntimeError(f"model replicas differ across ranks: {fingerprints}")
    log.info("model replicas identical on %d ranks (sha256 %s)", len(fingerprints), fingerprints[0][:16])
    return fingerprints[0]


def _log_step(
    progress: TrainProgress, meters: dict[str, SmoothedValue], data_time: SmoothedValue, step_time: SmoothedValue,
    optimizer: torch.optim.Optimizer, cfg: Config, steps_in_epoch: int, world_size: int,
    record: Callable[[dict], None], device: torch.device, skipped: int,
) -> None:
    lr = optimizer.param_groups[0]["lr"]
    images_per_s = cfg.train.batch_size * world_size / max(step_time.smoothed, 1e-9)
    total_steps = cfg.train.epochs * steps_in_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    eta = datetime.timedelta(seconds=int(step_time.smoothed * max(total_steps - progress.step, 0)))
    max_mem_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    if distributed.is_main_process():
        losses = "  ".join(f"{k} {m.smoothed:.4f} ({m.global_avg:.4f})" for k, m in sorted(meters.items()))
        log.info(
            "epoch %d [%d/%d] step %d  eta %s  %.1f img/s  data %.3fs  lr %.6f  %s",
            progress.epoch, progress.batch, steps_in_epoch, progress.step, eta, images_per_s,
            data_time.smoothed, lr, losses,
        )
        if skipped:
            log.warning("%d unreadable training images skipped so far in epoch %d", skipped, progress.epoch)
        record({
            **progress.to_dict(),
            "lr": lr,
            **{f"train/{k}": m.latest for k, m in meters.items()},
            **{f"train/{k}_smoothed": m.smoothed for k, m in meters.items()},
            "images_per_s": images_per_s,
            "data_time_s": data_time.smoothed,
            "max_memory_mb": max_mem_mb,
        })
