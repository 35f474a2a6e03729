"""Numeric precision of training and evaluation (`train.precision`): fp32, fp16 or bf16.

    scaler = grad_scaler(cfg.train.precision, device)    # enabled for fp16 only
    with autocast(cfg.train.precision, device):          # the forward pass, training and evaluation
        losses = model(images, targets)

fp16 is CUDA only and needs the GradScaler (its range underflows small gradients); bf16 has
fp32's range, so it runs without one, on CUDA (A100, H100 and later) and on the CPU. fp16 on
the CPU is refused rather than quietly run in another precision than the one asked for.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from dist_kp.config import ConfigError

DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}

log = logging.getLogger(__name__)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run (fp16 off CUDA), naming the key."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.precision=fp16 needs a CUDA device, this run is on {device.type}: "
                          "use train.precision=bf16 (autocast on the CPU) or fp32")


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """The run's GradScaler: enabled for fp16, a pass-through otherwise (it is part of the run state either way)."""
    check_precision(precision, device)
    log.info("precision %s%s", precision, f" (autocast to {DTYPES[precision]} on {device.type}"
             f"{', GradScaler' if precision == 'fp16' else ', no GradScaler'})" if precision in DTYPES else "")
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """torch.autocast to the precision's dtype on the device; nothing for fp32."""
    check_precision(precision, device)
    with torch.autocast(device_type=device.type, dtype=DTYPES.get(precision), enabled=precision in DTYPES):
        yield
