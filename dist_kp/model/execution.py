"""How the training step runs, not what it trains: train.channels_last, train.compile, train.cudnn_benchmark.

    model = build_model(cfg.model, num_keypoints, store).to(device)
    apply_execution_options(model, cfg.train, device)      # before DDP wraps it and the optimizer takes its params

None of them changes the model's parameters, their names or a checkpoint's content (a compiled
module keeps its state_dict keys; channels-last tensors hold the same values), so a run may turn
them on or off on resume. Each is off by default: keep one on where it measures faster
(bench/bench_gpu.py).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import KeypointRCNN

from dist_kp import distributed
from dist_kp.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

# The C++ compilers torch.compile's CPU code generation looks for (besides $CXX).
CPU_COMPILERS = ("g++", "c++", "clang++")


def check_execution_options(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse an option this machine cannot run, naming the key: train.compile on a CPU without a C++ compiler."""
    if cfg.compile != "none" and device.type == "cpu":
        compiler = os.environ.get("CXX") or next((c for c in CPU_COMPILERS if shutil.which(c)), None)
        if compiler is None:
            raise ConfigError(f"train.compile={cfg.compile} on the CPU needs a C++ compiler ({', '.join(CPU_COMPILERS)} "
                              "on PATH, or $CXX), and none is found: install one (apt-get install g++) or set "
                              "train.compile=none")


def _channels_last_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def apply_execution_options(model: KeypointRCNN, cfg: TrainConfig, device: torch.device) -> None:
    """Put the backbone+FPN in channels-last format and compile it as the config says; set cudnn.benchmark on CUDA.

    Only the backbone and FPN: the RoI heads see a new number of boxes every step (graph breaks and
    recompiles) and RoIAlign reads its features in the standard layout.
    """
    check_execution_options(cfg, device)
    if cfg.channels_last:
        model.backbone.to(memory_format=torch.channels_last)
        model.backbone.register_forward_pre_hook(_channels_last_input)
    if cfg.compile == "backbone":
        model.backbone.compile()  # in place: the state_dict keys stay those of the eager module
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    on = [name for name, value in (("channels_last", cfg.channels_last), ("compile=backbone", cfg.compile != "none"),
                                   ("cudnn_benchmark", cfg.cudnn_benchmark and device.type == "cuda")) if value]
    if on and distributed.is_main_process():
        log.info("training with %s", ", ".join(f"train.{name}" for name in on))
