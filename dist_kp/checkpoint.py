"""Checkpoints under OUTPUT_DIR/checkpoints/ on any fsspec file system, with exact resume.

Layout: one folder per global step, `step_00001200/` holding `state.pt` and `manifest.json`
(size and sha256 of state.pt), the manifest written last. A folder without a manifest that
matches its files is not a checkpoint. `TrainState` is the one place that says what a
checkpoint holds.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from dist_kp import distributed, storage
from dist_kp.config import CheckpointConfig, Config
from dist_kp.engine import TrainProgress
from dist_kp.model import unwrap

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names it."""


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


@dataclass
class TrainState:
    """Everything a checkpoint holds, and how each part is captured and restored."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    progress: TrainProgress
    config: Config
    tracking_run_id: str = ""
    versions: dict[str, str] = field(default_factory=versions)

    def capture(self, epoch_end: bool = False) -> dict[str, Any] | None:
        """A CPU snapshot on rank 0, None elsewhere (collective: every rank hands over its RNG states)."""
        rng = distributed.gather_objects(rng_state())
        if not distributed.is_main_process():
            return None  # DDP replicas are identical: only rank 0 pays for the copy
        return cpu_copy({
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": self.progress.to_dict(),
            "epoch_end": epoch_end,
            "rng": rng,
            "world_size": distributed.get_world_size(),
            "config": self.config.model_dump(mode="json"),
            "tracking_run_id": self.tracking_run_id,
            "versions": self.versions,
        })

    def restore(self, state: dict[str, Any], source: str) -> None:
        """Load a snapshot into the live objects; each rank takes its own RNG states."""
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress.epoch, self.progress.batch, self.progress.step = (
            state["progress"]["epoch"], state["progress"]["batch"], state["progress"]["step"])
        self.tracking_run_id = state.get("tracking_run_id", "")
        rank, saved_world = distributed.get_rank(), state["world_size"]
        if saved_world == distributed.get_world_size():
            set_rng_state(state["rng"][rank])
        else:
            log.warning("%s was saved by %d processes, now %d: random states restart from the seed (the data "
                        "order per rank changes too)", source, saved_world, distributed.get_world_size())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _lower_thread_priority() -> None:
    """Nice the writer thread (Linux niceness is per thread): steps and loader workers go first."""
    if sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class CheckpointStore:
    """Save, list, validate, load and prune checkpoints under OUTPUT_DIR/checkpoints/.

    Saves run in one background thread (at most one in flight); an error in a save is raised
    by the next call to `save` or `raise_pending`, and `wait` blocks until the last is done.
    """

    def __init__(self, output_dir: str, cfg: CheckpointConfig) -> None:
        self.url = f"{output_dir.rstrip('/')}/checkpoints"
        self.cfg = cfg
        self.fs, self.path = storage.url_to_fs(self.url)
        self.protected: set[int] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint",
                                                           initializer=_lower_thread_priority)
        self._pending: concurrent.futures.Future | None = None
        # Told (step, url) of each checkpoint handed to the writer (main thread) and of each stored
        # one (saving thread): W&B gets the URL.
        self.on_started: Callable[[int, str], None] | None = None
        self.on_saved: Callable[[int, str], None] | None = None

    def step_url(self, step: int) -> str:
        return f"{self.url}/step_{step:08d}"

    def _step_path(self, step: int) -> str:
        return f"{self.path}/step_{step:08d}"

    def steps(self) -> list[int]:
        """Steps that have a checkpoint folder (valid or not), oldest first."""
        try:
            if not self.fs.exists(self.path):
                return []
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        except Exception as error:  # noqa: BLE001 - every backend error becomes a named StorageError
            raise storage.explain(error, self.url) from error
        return sorted(int(n[5:]) for n in names if n.startswith("step_") and n[5:].isdigit())

    def write(self, step: int, state: dict[str, Any]) -> str:
        """Serialize and store one checkpoint, manifest last; then prune. Returns its URL."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getbuffer()  # no copy of a possibly large buffer
        folder = self._step_path(step)
        manifest = {"step": step, "epoch": state["progress"]["epoch"], "epoch_end": state["epoch_end"],
                    "created": time.time(), "files": {STATE_FILE: {"size": len(data), "sha256": _sha256(data)}}}
        try:
            # The manifest goes last: until it is stored the folder is not a checkpoint.
            storage.write_file(self.fs, f"{folder}/{STATE_FILE}", data)
            storage.write_file(self.fs, f"{folder}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        except Exception as error:  # noqa: BLE001
            raise storage.explain(error, self.step_url(step)) from error
        self.prune()
        return self.step_url(step)

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Write `state` (a CPU snapshot) in the background; rank 0 only.

        Waits for the save in flight first (at most one), raising its error as CheckpointError.
        """
        self.wait()
        self._pending = self._pool.submit(self._write_logged, step, state)
        if self.on_started is not None:
            self.on_started(step, self.step_url(step))

    def _write_logged(self, step: int, state: dict[str, Any]) -> str:
        started = time.perf_counter()
        url = self.write(step, state)
        log.info("checkpoint step %d saved to %s in %.1f s", step, url, time.perf_counter() - started)
        if self.on_saved is not None:
            self.on_saved(step, url)
        return url

    @property
    def in_flight(self) -> bool:
        """True while a background save is still writing."""
        return self._pending is not None and not self._pending.done()

    def raise_pending(self) -> None:
        """Raise the error of a finished background save, if any."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight is done; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except Exception as error:
                raise CheckpointError(f"saving a checkpoint failed: {error}") from error

    def manifest(self, step: int) -> dict[str, Any] | None:
        """The manifest of a complete checkpoint, or None when it is partial or inconsistent."""
        folder = self._step_path(step)
        try:
            with self.fs.open(f"{folder}/{MANIFEST}", "rb") as f:
                manifest = json.loads(f.read())
            for name, entry in manifest["files"].items():
                if self.fs.size(f"{folder}/{name}") != entry["size"]:
                    return None
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None
        except Exception as error:  # noqa: BLE001
            raise storage.explain(error, self.step_url(step)) from error
        return manifest

    def read(self, url: str) -> dict[str, Any]:
        """Load a checkpoint folder URL, verifying the manifest's sizes and sha256."""
        fs, folder = storage.url_to_fs(url.rstrip("/"))
        try:
            with fs.open(f"{folder}/{MANIFEST}", "rb") as f:
                manifest = json.loads(f.read())
            entry = manifest["files"][STATE_FILE]
            with fs.open(f"{folder}/{STATE_FILE}", "rb") as f:
                data = f.read()
        except FileNotFoundError as error:
            raise CheckpointError(f"{url}: incomplete checkpoint (no {error.filename or 'manifest'})") from None
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{url}: unreadable manifest ({error})") from None
        except Exception as error:  # noqa: BLE001
            raise storage.explain(error, url) from error
        if len(data) != entry["size"] or _sha256(data) != entry["sha256"]:
            raise CheckpointError(f"{url}: {STATE_FILE} does not match its manifest (truncated or corrupt)")
        try:
            # A checkpoint is untrusted input: weights_only refuses anything but tensors and plain data.
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(f"{url}: refused to load ({type(error).__name__}: {error})") from None

    def latest(self) -> tuple[str, dict[str, Any]] | None:
        """The newest checkpoint that loads, skipping (with a warning naming it) corrupt or partial ones."""
        for step in reversed(self.steps()):
            url = self.step_url(step)
            if self.manifest(step) is None:
                log.warning("skipping %s: partial checkpoint (no valid manifest)", url)
                continue
            try:
                return url, self.read(url)
            except CheckpointError as error:
                log.warning("skipping %s: %s", url, error)
        return None

    def prune(self) -> None:
        """Keep the newest `keep_last` valid checkpoints, the protected one and every K-th epoch end.

        Partial folders older than the newest valid checkpoint (left by a killed save) go too.
        """
        steps = self.steps()
        manifests = {s: self.manifest(s) for s in steps}
        valid = [(s, m) for s, m in manifests.items() if m is not None]
        if not valid:
            return
        keep = {s for s, _ in valid[-self.cfg.keep_last:]} | self.protected
        if self.cfg.keep_every_epochs:
            keep |= {s for s, m in valid if m["epoch_end"] and m["epoch"] % self.cfg.keep_every_epochs == 0}
        newest = valid[-1][0]
        for step in steps:
            if step not in keep and (manifests[step] is not None or step < newest):
                self.fs.rm(self._step_path(step), recursive=True)

    def abort_unfinished_uploads(self) -> int:
        """Object stores: abort multipart uploads left under checkpoints/ by a killed or failed save.

        They are invisible (not checkpoints) but stored and billed. Call only while no save of
        this run is in flight (rank 0 at start). Returns how many were aborted.
        """
        if not hasattr(self.fs, "abort_mpu"):  # s3fs only
            return 0
        bucket, _, prefix = self.path.partition("/")
        with storage.named_errors(self.url):
            uploads = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=f"{prefix}/").get("Uploads", [])
            for upload in uploads:
                self.fs.abort_mpu(bucket, upload["Key"], upload["UploadId"])
        if uploads:
            log.info("aborted %d unfinished uploads under %s (left by an interrupted save)", len(uploads), self.url)
        return len(uploads)

    def resolve(self, resume: str) -> tuple[str, dict[str, Any]] | None:
        """The checkpoint to resume from per checkpoint.resume (auto, none, or a URL); rank 0, at start."""
        self.abort_unfinished_uploads()
        if resume == "none":
            old = self.steps()
            if old and not self.cfg.overwrite:
                raise CheckpointError(
                    f"{self.url} already holds checkpoints and checkpoint.resume=none: set "
                    "checkpoint.resume=auto to continue that run, or checkpoint.overwrite=true to start over"
                )
            if old:
                # Left in place, the old run's later steps would win every prune and the next resume.
                log.warning("checkpoint.overwrite=true: deleting the %d checkpoints of the earlier run in %s",
                            len(old), self.url)
                self.fs.rm(self.path, recursive=True)
            return None
        if resume == "auto":
            return self.latest()
        return resume, self.read(resume)


def resume_training(store: CheckpointStore, train_state: TrainState) -> str | None:
    """Every rank loads the checkpoint rank 0 chose; returns its URL (None: fresh start)."""
    found = store.resolve(train_state.config.checkpoint.resume) if distributed.is_main_process() else None
    chosen = distributed.broadcast_object(found[0] if found else None)
    if chosen is None:
        return None
    train_state.restore(found[1] if found else store.read(chosen), chosen)
    store.protected.add(train_state.progress.step)
    return chosen


class Checkpointer:
    """When to checkpoint: every `every_steps` steps, at epoch ends, at the end and on request.

    `save` is collective (every rank hands over its RNG states); rank 0 writes in the background.
    """

    def __init__(self, store: CheckpointStore, train_state: TrainState, steps_per_epoch: int) -> None:
        self.store = store
        self.state = train_state
        self.steps_per_epoch = steps_per_epoch
        self.last_saved_step = train_state.progress.step if train_state.progress.step else -1

    def save(self, epoch_end: bool = False, wait: bool = False) -> None:
        """Checkpoint the current step (once per step); `wait` blocks until it is stored."""
        step = self.state.progress.step
        if step != self.last_saved_step:
            snapshot = self.state.capture(epoch_end)
            if distributed.is_main_process():
                self.store.save(step, snapshot)
            self.last_saved_step = step
        if wait and distributed.is_main_process():
            self.store.wait()

    def after_step(self, progress: TrainProgress) -> bool:
        """Step hook for engine.train_one_epoch; surfaces a failed background save."""
        if distributed.is_main_process():
            self.store.raise_pending()
        # An epoch's last step is saved next as the epoch end (kept by keep_every_epochs), not here.
        if progress.step % self.store.cfg.every_steps == 0 and progress.batch != self.steps_per_epoch:
            self.save()
        return False

    def close(self) -> None:
        if distributed.is_main_process():
            self.store.wait()
