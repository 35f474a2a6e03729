"""The optimizer and the learning-rate schedule of the reference recipe: SGD, warmup, multistep or cosine.

The schedule follows training progress, not a step count of one world size: warmup counts
optimizer steps, the decay counts epochs of data trained (an epoch and the fraction of its
samples), so a run resumed on another number of processes meets its milestones at the same
epochs. A resumed run takes optim.* and schedule.* from its config (`apply_optim_config`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from dist_kp.config import Config, OptimConfig, ScheduleConfig

# Where training stands for the schedule: (optimizer steps done, epochs of data trained).
Position = Callable[[], tuple[int, Fraction]]


def lr_factor(step: int, schedule: ScheduleConfig, steps_per_epoch: int, total_steps: int,
              epochs_done: Fraction | None = None) -> float:
    """Multiplier of the base lr after `step` optimizer steps and `epochs_done` epochs of data
    (step / steps_per_epoch when not given): linear warmup by steps, then multistep or cosine by epochs."""
    epochs_done = Fraction(step, steps_per_epoch) if epochs_done is None else epochs_done
    factor = 1.0
    if step < schedule.warmup_iters:
        alpha = step / schedule.warmup_iters
        factor = schedule.warmup_factor * (1 - alpha) + alpha
    if schedule.name == "multistep":
        passed = sum(1 for m in schedule.milestones if epochs_done >= m)
        return factor * schedule.gamma**passed
    epochs = Fraction(max(total_steps, 1), steps_per_epoch)
    return factor * 0.5 * (1 + math.cos(math.pi * min(float(epochs_done / epochs), 1.0)))


def batch_scaling(cfg: Config, world_size: int) -> str:
    """The two numbers the linear scaling rule keeps (README "Learning rate and batch size"), for the start's log:
    the lr per image of the total batch and the warmup's length in images."""
    batch = cfg.train.batch_size * world_size
    warmup = cfg.schedule.warmup_iters
    return (f"total batch {batch} ({world_size} process{'es' if world_size > 1 else ''} x {cfg.train.batch_size} "
            f"images): optim.lr {cfg.optim.lr:g} = {cfg.optim.lr / batch:.4g} per image, schedule.warmup_iters "
            f"{warmup} = {warmup * batch:,} images; for another total batch keep both (lr x k, warmup_iters / k)")


def implementation_flags(optim: OptimConfig) -> dict[str, bool | None]:
    """SGD's foreach and fused arguments for optim.implementation (None: torch decides)."""
    return {"foreach": True if optim.implementation == "foreach" else None,
            "fused": True if optim.implementation == "fused" else None}


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                           **implementation_flags(cfg.optim))


class ProgressSchedule(torch.optim.lr_scheduler.LRScheduler):
    """lr = base lr x `lr_factor` at the position the trainer reports (`follow`); until then, by steps.

    Its saved state is the step count only: base lrs and the factor come from the config.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, epochs: int,
                 steps_per_epoch: int) -> None:
        self.schedule = schedule
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = epochs * steps_per_epoch
        self.position: Position = lambda: (self.last_epoch, Fraction(self.last_epoch, steps_per_epoch))
        super().__init__(optimizer)

    def follow(self, position: Position) -> None:
        """Take the position from `position()` from now on, and set the lr for the current one."""
        self.position = position
        self.refresh()

    def factor(self) -> float:
        step, epochs_done = self.position()
        return lr_factor(step, self.schedule, self.steps_per_epoch, self.total_steps, epochs_done)

    def get_lr(self) -> list[float]:
        factor = self.factor()
        return [base * factor for base in self.base_lrs]

    def refresh(self) -> None:
        """Set every param group's lr for the current position (after a resume or a config change)."""
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = int(state["last_epoch"])


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int) -> ProgressSchedule:
    """Per-iteration schedule; a pure function of the position, so resuming restores it exactly."""
    return ProgressSchedule(optimizer, cfg.schedule, cfg.train.epochs, steps_per_epoch)


def apply_optim_config(optimizer: torch.optim.Optimizer, scheduler: ProgressSchedule, optim: OptimConfig) -> None:
    """After loading a checkpoint: the config's lr, momentum, weight decay and implementation, not the saved ones,
    from now on (load_state_dict puts back the saved groups' foreach and fused flags)."""
    for group in optimizer.param_groups:
        group.update(initial_lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                     **implementation_flags(optim))
    scheduler.base_lrs = [optim.lr] * len(optimizer.param_groups)
    scheduler.refresh()
