"""An exponential moving average (EMA) of a model's trained weights (`train.ema`), as timm and ultralytics keep it.

    ema = ModelEMA(model, cfg.train.ema)   # a copy of the model (DDP unwrapped) whose trained parameters average
    ema.update()                           # after every optimizer step, on every rank alike
    ema.module                             # the averaged model, in eval mode: evaluate it, write its weights

After `updates` updates the decay is d = decay * (1 - exp(-updates / warmup_steps)) (ultralytics'
ramp; warmup_steps=0: d = decay), and each trained parameter p of the average becomes
d * p + (1 - d) * p_model in fp32, in one foreach lerp under no_grad: a pure function of the
weights and the count, so two runs that saw the same weights hold the same average bit for bit.
What does not train (buffers such as BatchNorm statistics, frozen parameters) is the live model's
own tensors, shared rather than averaged: the average always has the model's current statistics,
also on each rank after DDP broadcasts them. Its state (the count and the averaged parameters)
goes into every checkpoint.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from dist_kp.config import EMAConfig
from dist_kp.model.errors import WeightsError
from dist_kp.model.keypoint_rcnn import unwrap


def ema_decay(cfg: EMAConfig, updates: int) -> float:
    """The decay of update number `updates` (1 for the first): train.ema.decay ramped over warmup_steps."""
    if cfg.warmup_steps == 0:
        return cfg.decay
    return cfg.decay * (1.0 - math.exp(-updates / cfg.warmup_steps))


class ModelEMA:
    """The averaged copy of a model; see the module docstring."""

    def __init__(self, model: nn.Module, cfg: EMAConfig) -> None:
        self.cfg = cfg
        self.updates = 0
        live = unwrap(model)
        self.module = copy.deepcopy(live).eval()
        self.names: list[str] = []
        self._averaged: list[nn.Parameter] = []
        self._trained: list[torch.Tensor] = []
        for name, parameter in live.named_parameters():
            owner, leaf = self._owner(name)
            if parameter.requires_grad:
                averaged = nn.Parameter(parameter.detach().to(torch.float32, copy=True), requires_grad=False)
                owner._parameters[leaf] = averaged
                self.names.append(name)
                self._averaged.append(averaged)
                self._trained.append(parameter)
            else:
                owner._parameters[leaf] = parameter
        for name, buffer in live.named_buffers():
            owner, leaf = self._owner(name)
            owner._buffers[leaf] = buffer

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        path, _, leaf = name.rpartition(".")
        return self.module.get_submodule(path), leaf

    @property
    def decay(self) -> float:
        """The decay of the latest update (0.0 before the first)."""
        return ema_decay(self.cfg, self.updates) if self.updates else 0.0

    @torch.no_grad()
    def update(self) -> None:
        """Average in the model's current trained parameters (call after each optimizer step)."""
        self.updates += 1
        weights = [p.detach().float() for p in self._trained]
        torch._foreach_lerp_(self._averaged, weights, 1.0 - ema_decay(self.cfg, self.updates))

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average over from the model's current weights (a resumed run that kept none)."""
        self.updates = 0
        torch._foreach_copy_(self._averaged, [p.detach().float() for p in self._trained])

    def describe(self) -> str:
        """'EMA weights (decay 0.9998, warmup 2000 steps, 120 updates)': what the logs and files say."""
        return f"EMA weights (decay {self.cfg.decay}, warmup {self.cfg.warmup_steps} steps, {self.updates} updates)"

    def file_record(self) -> dict[str, Any]:
        """What a weights file of the average records beside it: ema, and its decay, warmup and update count."""
        return {"ema": True, "ema_decay": self.cfg.decay, "ema_warmup_steps": self.cfg.warmup_steps,
                "ema_updates": self.updates}

    def state_dict(self) -> dict[str, Any]:
        """The update count and the averaged parameters (buffers and frozen parameters are the model's)."""
        return {"updates": self.updates, "decay": self.cfg.decay, "warmup_steps": self.cfg.warmup_steps,
                "parameters": dict(zip(self.names, self._averaged))}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`: exactly the same trained parameters, in the same shapes."""
        saved = state["parameters"]
        missing = [name for name in self.names if name not in saved]
        unknown = [name for name in saved if name not in self.names]
        if missing or unknown:
            raise WeightsError(f"the EMA of the weights in the checkpoint does not fit the model: missing "
                               f"{missing[:5] or 'none'}, not in the model {unknown[:5] or 'none'}")
        for name, averaged in zip(self.names, self._averaged):
            if saved[name].shape != averaged.shape:
                raise WeightsError(f"the EMA of the weights in the checkpoint has {name} of shape "
                                   f"{list(saved[name].shape)}, the model {list(averaged.shape)}")
            averaged.copy_(saved[name])
        self.updates = int(state["updates"])
