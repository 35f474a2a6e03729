"""The training loop and every progress counter; periodic actions are hooks.

    trainer = Trainer(cfg.train, model, optimizer, scheduler, scaler, DeviceBatches(loader, device), sampler, device)
    trainer.register(hook)            # checkpoint, evaluation, tracking, preemption, your own
    trainer.train()

One function per loop, as in torchvision's reference engine: `train` walks the epochs,
`train_one_epoch` the steps of one epoch. Hooks see the trainer at every event
(dist_kp.engine.hooks); a hook emits the events it causes (`trainer.emit("after_evaluation",
metrics)`) and ends training with `request_stop`.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dist_kp import distributed
from dist_kp.config import TrainConfig
from dist_kp.data.device_batches import DeviceBatches
from dist_kp.data.sampler import GroupedDistributedBatchSampler
from dist_kp.engine.schedule import ProgressSchedule
from dist_kp.model.precision import autocast

if TYPE_CHECKING:
    from dist_kp.engine.checkpointer import Resumed
    from dist_kp.engine.hooks import Hook
    from dist_kp.evaluation.evaluator import EvalOutput

log = logging.getLogger(__name__)


@dataclass
class TrainProgress:
    """Where training stands: `batch` batches of `epoch` are done, `step` optimizer steps in all.

    `earlier`: the parts of this epoch trained on other numbers of processes before, as
    [world size, batches] each; `batch` counts the batches of the epoch's rest since then.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    earlier: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "step": self.step}

    def state_dict(self) -> dict[str, Any]:
        return {**self.to_dict(), "earlier": [list(part) for part in self.earlier]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch, self.step = int(state["epoch"]), int(state["batch"]), int(state["step"])
        self.earlier = [[int(world_size), int(batches)] for world_size, batches in state.get("earlier", [])]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite on some rank; every rank raises it at the same step."""


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


class Trainer:
    """Owns the loop and the progress counters (epoch, batch within the epoch, global step).

    It gets what it uses: the `train` config section, the model and its optimizer, LR schedule
    and grad scaler, the loader's batches on the device (DeviceBatches) with the loader's sampler,
    the device. The epoch length comes from the
    sampler and the stop condition from train.epochs and train.max_steps, each computed here
    once; hooks read them from the trainer.
    """

    def __init__(
        self, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
        scheduler: ProgressSchedule, scaler: torch.amp.GradScaler, loader: DeviceBatches,
        sampler: GroupedDistributedBatchSampler, device: torch.device, clip_grad_norm: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.loader = loader
        self.sampler = sampler
        self.device = device
        self.clip_grad_norm = clip_grad_norm
        self.progress = TrainProgress()
        self.steps_per_epoch = sampler.batches_per_epoch
        self.total_steps = self._capped(cfg.epochs * self.steps_per_epoch)
        self.hooks: list[Hook] = []
        # Why training ends before its last step ("preempted", "early stop"); None while it goes on.
        self.stop_reason: str | None = None
        # This step's training record (losses, lr, throughput) when it is a logged step, else None.
        self.log_record: dict[str, Any] | None = None
        # This step's targets on this rank, on the device (image_id says which samples they are).
        self.batch_targets: list[dict[str, torch.Tensor]] = []
        # The newest evaluation (set by the evaluation hook before it tells the hooks the metrics).
        self.evaluation: EvalOutput | None = None
        scheduler.follow(self.schedule_position)

    def _capped(self, steps: int) -> int:
        return steps if self.cfg.max_steps is None else min(steps, self.cfg.max_steps)

    def continue_from(self, resumed: Resumed) -> None:
        """Take over a checkpoint's position (progress is restored by then).

        A checkpoint written by another number of processes continues its epoch exactly: the
        sampler turns the part trained so far into one more earlier part of the epoch.
        """
        p, world_size = self.progress, distributed.get_world_size()
        p.batch, p.earlier = self.sampler.continue_epoch(p.epoch, p.batch, p.earlier, resumed.world_size)
        later_epochs = (self.cfg.epochs - p.epoch - 1) * self.steps_per_epoch
        self.total_steps = self._capped(p.step + len(self.sampler) + later_epochs)
        if resumed.world_size != world_size and distributed.is_main_process():
            batch = self.sampler.batch_size
            log.warning("resumed on %d process%s, checkpoint written by %d; continuing epoch %d at sample %s of %s "
                        "(%d steps per process left in it; %d images per step, were %d: optim.lr is not rescaled)",
                        world_size, "es" if world_size > 1 else "", resumed.world_size, p.epoch,
                        f"{self.sampler.samples_done(p.batch):,}", f"{self.sampler.num_samples:,}", len(self.sampler),
                        batch * world_size, batch * resumed.world_size)

    def schedule_position(self) -> tuple[int, Fraction]:
        """(optimizer steps done, epochs of data trained): what the LR schedule follows."""
        p = self.progress
        return p.step, p.epoch + Fraction(self.sampler.samples_done(p.batch), self.sampler.num_samples)

    def register(self, hook: Hook) -> None:
        """Add a hook; hooks are called in the order they were registered."""
        self.hooks.append(hook)

    def request_stop(self, reason: str) -> None:
        """End training after the current step (every rank must ask at the same step)."""
        self.stop_reason = self.stop_reason or reason

    @property
    def finished(self) -> bool:
        """True once every epoch is trained or train.max_steps steps are done."""
        max_steps = self.cfg.max_steps
        return self.progress.epoch >= self.cfg.epochs or (max_steps is not None and self.progress.step >= max_steps)

    @property
    def past_end(self) -> bool:
        """The progress lies beyond the end: train.epochs or train.max_steps lowered below a resumed checkpoint."""
        p, max_steps = self.progress, self.cfg.max_steps
        return (p.epoch, p.batch) > (self.cfg.epochs, 0) or (max_steps is not None and p.step > max_steps)

    @property
    def epoch_complete(self) -> bool:
        return self.progress.batch == self.sampler.batches_this_epoch

    def emit(self, event: str, *args: Any) -> None:
        """Call `event` on every hook, in registration order (hooks emit after_evaluation, after_checkpoint)."""
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def train(self) -> None:
        """Train from the current progress to the end, or until a hook asks to stop."""
        self.emit("before_train")
        while not self.finished and self.stop_reason is None:
            self.train_one_epoch()
            if self.stop_reason is None and self.epoch_complete:
                self.progress.epoch += 1
                self.progress.batch = 0
                self.progress.earlier = []
                self.emit("after_epoch")
        self.emit("after_train")

    def train_one_epoch(self) -> None:
        """Train the rest of the current epoch, or until max_steps or a stop request.

        On return every rank holds rank 0's buffers (BatchNorm statistics), so that evaluation
        and checkpoints see one model. Loss terms are all-reduced every step: one small
        collective that also tells every rank when any rank's loss stopped being finite.
        """
        self.model.train()
        self.sampler.set_epoch(self.progress.epoch, start_batch=self.progress.batch, earlier=self.progress.earlier)
        meters: dict[str, SmoothedValue] = {}
        data_time, step_time = SmoothedValue(), SmoothedValue()
        start = end = time.perf_counter()
        skipped_total = 0
        for images, targets, skipped in self.loader:
            data_time.update(time.perf_counter() - end)
            skipped_total += skipped
            self.batch_targets = targets
            reduced = self._step(images, targets)
            for name, value in reduced.items():
                meters.setdefault(name, SmoothedValue()).update(value)
            step_time.update(time.perf_counter() - end)
            # An epoch's and the run's last step are always logged: a smoke run shorter than log_every logs too.
            logged = self.progress.step % self.cfg.log_every == 0 or self.epoch_complete or self.finished
            self.log_record = self._log_step(meters, data_time, step_time, skipped_total) if logged else None
            self.emit("after_step")
            if self.stop_reason is not None or self.finished:
                break
            end = time.perf_counter()
        distributed.broadcast_buffers(self.model)
        if self.epoch_complete:
            log.info("epoch %d done in %s", self.progress.epoch,
                     datetime.timedelta(seconds=int(time.perf_counter() - start)))

    def _step(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step; returns the loss terms averaged over ranks."""
        distributed.training_step(self.progress.step + 1)
        with autocast(self.cfg.precision, self.device):
            losses = self.model(images, targets)
        loss = sum(losses.values())
        reduced = distributed.all_reduce_mean({**losses, "loss": loss})
        self._check_finite(losses, reduced)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.progress.batch += 1
        self.progress.step += 1
        self.scheduler.step()  # after the position moved: the lr of the next step
        return reduced

    def _check_finite(self, losses: dict[str, torch.Tensor], reduced: dict[str, float]) -> None:
        p = self.progress
        local_bad = {k: v.item() for k, v in losses.items() if not math.isfinite(v.item())}
        if local_bad:
            log.error("non-finite loss on rank %d at step %d: %s", distributed.get_rank(), p.step, local_bad)
        if not all(math.isfinite(v) for v in reduced.values()):
            raise NonFiniteLossError(
                f"non-finite loss at step {p.step} (epoch {p.epoch}, batch {p.batch}); "
                f"mean over ranks: {reduced}; the failing rank logged its own values"
            )

    def _log_step(self, meters: dict[str, SmoothedValue], data_time: SmoothedValue, step_time: SmoothedValue,
                  skipped: int) -> dict[str, Any]:
        """Rank 0's progress line; the step's record (every rank builds it, tracking sends rank 0's)."""
        p = self.progress
        lr = self.optimizer.param_groups[0]["lr"]
        images_per_s = self.sampler.batch_size * distributed.get_world_size() / max(step_time.smoothed, 1e-9)
        eta = datetime.timedelta(seconds=int(step_time.smoothed * max(self.total_steps - p.step, 0)))
        max_mem_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else 0.0
        if distributed.is_main_process():
            losses = "  ".join(f"{k} {m.smoothed:.4f} ({m.global_avg:.4f})" for k, m in sorted(meters.items()))
            log.info("epoch %d [%d/%d] step %d  eta %s  %.1f img/s  data %.3fs  lr %.6f  %s", p.epoch, p.batch,
                     self.sampler.batches_this_epoch, p.step, eta, images_per_s, data_time.smoothed, lr, losses)
            if skipped:
                log.warning("%d unreadable or mis-sized training images skipped so far in epoch %d", skipped, p.epoch)
        return {
            **p.to_dict(),
            "lr": lr,
            **{f"train/{k}": m.latest for k, m in meters.items()},
            **{f"train/{k}_smoothed": m.smoothed for k, m in meters.items()},
            "images_per_s": images_per_s,
            "data_time_s": data_time.smoothed,
            "max_memory_mb": max_mem_mb,
        }
