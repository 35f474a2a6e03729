"""What a checkpoint holds, in one registry (dist_kp.engine.checkpointer saves and resumes it).

    state = RunState(cfg, data)               # data: dist_kp.data.fingerprint.data_fingerprint(...)
    state.register("model", model)            # anything with state_dict() / load_state_dict()
    state.register("optimizer", optimizer)
    state.register_hook(hook)                 # a hook's state (may be missing from a checkpoint)
    snapshot = state.capture()                # collective; rank 0 gets a CPU copy to store
    state.restore(snapshot, url)              # config changes checked; each rank its own RNG states

Besides the registered parts a snapshot holds every rank's random states (restored when the
world size is unchanged), the world size that wrote it, the resolved config, the training
data's fingerprint, its keypoints (names, skeleton, category id: what predict and export need
beside the model) and the versions. A moved dataset (data.root or data.train_annotations
changed) resumes when that fingerprint is unchanged.
"""

from __future__ import annotations

import logging
import random
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torchvision

from dist_kp import distributed
from dist_kp.config import Config
from dist_kp.config.fingerprint import flatten

log = logging.getLogger(__name__)

# Config keys that make a run what it is: a checkpoint written under other values is another run.
# The model, the training set and what its epochs are made of (seed, batch size, grouping).
IDENTITY_KEYS = ("model.", "train.seed", "train.batch_size", "data.root", "data.train_annotations",
                 "data.train_images", "data.min_visible_keypoints", "data.aspect_ratio_group_factor")
# Where the model's starting weights came from no longer matters once a checkpoint holds them.
NOT_IDENTITY = ("model.weights", "model.backbone_weights", "model.weights_strict", "model.weights_any_architecture")
# Where the training set lies: it may change (a dataset moved) when the data fingerprint does not.
DATA_LOCATION_KEYS = ("data.root", "data.train_annotations")


class ResumeError(RuntimeError):
    """A checkpoint that this run cannot continue from; the message names it and the reason."""


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def rng_state() -> dict[str, Any]:
    """This process's random states, as tensors and plain Python values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": version, "state": list(python_state), "gauss": python_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor on the CPU: training may go on changing the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> dict[str, str]:
    try:
        own = metadata.version("dist_kp")
    except metadata.PackageNotFoundError:
        own = "unknown"
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "dist_kp": own,
            "git_commit": _git_commit()}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose value differs between two config dumps: {key: (saved, current)}."""
    old, new = flatten(saved), flatten(current)
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def identity_changes(changes: dict[str, tuple[Any, Any]]) -> list[str]:
    """The changed keys that make it another run (IDENTITY_KEYS); every other change is applied on resume."""
    return [k for k in changes if k.startswith(IDENTITY_KEYS) and not k.startswith(NOT_IDENTITY)]


def data_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Each data fingerprint entry (key: (digest, shown)) that differs, as 'key X in the checkpoint, Y now'."""
    return [f"{key} {saved[key][1] if key in saved else 'unrecorded'} in the checkpoint, {shown} now"
            for key, (digest, shown) in current.items() if key not in saved or saved[key][0] != digest]


class RunState:
    """The registry of what a checkpoint holds: capture() makes a snapshot, restore() loads one."""

    def __init__(self, config: Config, data: dict[str, tuple[str, str]],
                 keypoints: dict[str, Any] | None = None) -> None:
        self.config = config
        self.data = data
        self.keypoints = keypoints
        self.parts: dict[str, Stateful] = {}
        self.optional: set[str] = set()  # parts a checkpoint may lack (hooks)
        self.versions = versions()

    def register(self, name: str, part: Stateful) -> None:
        if name in self.parts or name in ("rng", "world_size", "config", "data", "keypoints", "versions", "epoch_end"):
            raise ValueError(f"run state part {name!r} is registered twice")
        self.parts[name] = part

    def register_hook(self, hook: Stateful) -> str:
        """A hook's state, saved as "hook:<module>.<class>" (numbered when a class is registered twice).

        Unlike the other parts it may be missing from a checkpoint (a hook added since): it then
        starts fresh. Returns the name.
        """
        base = f"hook:{type(hook).__module__}.{type(hook).__qualname__}"
        name, n = base, 1
        while name in self.parts:
            n += 1
            name = f"{base}#{n}"
        self.register(name, hook)
        self.optional.add(name)
        return name

    def capture(self, epoch_end: bool = False) -> dict[str, Any] | None:
        """A CPU snapshot on rank 0, None elsewhere (collective: every rank hands over its RNG states)."""
        rng = distributed.gather_objects(rng_state())
        if not distributed.is_main_process():
            return None  # DDP replicas are identical: only rank 0 pays for the copy
        return cpu_copy({
            **{name: part.state_dict() for name, part in self.parts.items()},
            "epoch_end": epoch_end,
            "rng": rng,
            "world_size": distributed.get_world_size(),
            "config": self.config.model_dump(mode="json"),
            "data": self.data,
            "keypoints": self.keypoints,
            "versions": self.versions,
        })

    def check_compatible(self, state: dict[str, Any], source: str) -> None:
        """Log every config key changed since the checkpoint; refuse the ones that make it another run."""
        changes = config_changes(state.get("config", {}), self.config.model_dump(mode="json"))
        refused = identity_changes(changes)
        content = data_changes(state.get("data", {}), self.data)
        if not content:  # the same training data, moved
            refused = [k for k in refused if k not in DATA_LOCATION_KEYS]
        if refused:
            listed = ", ".join(f"{k} ({changes[k][0]!r} in the checkpoint, {changes[k][1]!r} now)" for k in refused)
            moved = [k for k in refused if k in DATA_LOCATION_KEYS]
            why = "" if not moved else (f": the content differs ({'; '.join(content)})" if "data" in state
                                        else ": the checkpoint records no data fingerprint to compare")
            raise ResumeError(
                f"{source} was written by a run with another {listed}{why}; resume it with the config it was "
                "written with, or start a new run (another output_dir, or checkpoint.resume=none with "
                "checkpoint.overwrite=true)"
            )
        missing = [name for name in self.parts if name not in state and name not in self.optional]
        if missing:
            raise ResumeError(f"{source} holds no {', '.join(missing)}: it was not written by this version of dist_kp")
        if distributed.is_main_process():
            step = state.get("progress", {}).get("step")
            for key, (old, new) in changes.items():
                log.info("config changed since %s: %s %r -> %r, applied from step %s on", source, key, old, new, step)

    def restore(self, state: dict[str, Any], source: str) -> None:
        """Load a snapshot into the live objects; each rank takes its own RNG states."""
        self.check_compatible(state, source)
        for name, part in self.parts.items():
            if name in state:
                part.load_state_dict(state[name])
            elif distributed.is_main_process():
                log.info("%s holds no state of %s: it starts fresh", source, name.removeprefix("hook:"))
        if distributed.is_main_process():
            for name in sorted(k for k in state if k.startswith("hook:") and k not in self.parts):
                log.info("%s holds the state of %s, a hook this run does not have (train.ema off, or no longer in "
                         "train.hooks): ignored", source, name.removeprefix("hook:"))
        rank, saved_world = distributed.get_rank(), state["world_size"]
        if saved_world == distributed.get_world_size():
            set_rng_state(state["rng"][rank])
        else:
            log.warning("%s was saved by %d processes, now %d: random states restart from the seed (the data "
                        "order stays exact)", source, saved_world, distributed.get_world_size())
