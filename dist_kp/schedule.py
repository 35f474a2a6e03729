"""The optimizer and the learning-rate schedule of the reference recipe: SGD, warmup, multistep or cosine."""

from __future__ import annotations

import math

import torch
from torch import nn

from dist_kp.config import Config, ScheduleConfig


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
