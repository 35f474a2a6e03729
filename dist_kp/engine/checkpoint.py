"""Checkpoints under OUTPUT_DIR/checkpoints/ on any fsspec file system, with exact resume.

Layout: one folder per global step, `step_00001200/` holding `state.pt` and `manifest.json`
(size and sha256 of state.pt), the manifest written last. A folder without a manifest that
matches its files is not a checkpoint. What a checkpoint holds is `RunState`'s business; this
module stores, lists, validates, loads and prunes them.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dist_kp import storage
from dist_kp.config import CheckpointConfig
from dist_kp.storage.run_folder import CHECKPOINT_MANIFEST as MANIFEST
from dist_kp.storage.run_folder import CHECKPOINT_STATE as STATE_FILE
from dist_kp.storage.run_folder import RunFolder, checkpoint_step, some_of
from dist_kp.storage.untrusted import load_untrusted

log = logging.getLogger(__name__)

# Told (step, url) of a checkpoint once it is stored (from the writing thread).
SaveListener = Callable[[int, str], None]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names it."""


def new_lineage() -> str:
    """An id for the checkpoints of a run that starts fresh or branches from an explicit checkpoint."""
    return uuid.uuid4().hex[:12]


def normalized_url(url: str) -> str:
    """One spelling per checkpoint location: local paths absolute, no trailing slash."""
    url = url.rstrip("/")
    return os.path.abspath(storage.local_path(url)) if storage.is_local_url(url) else url


def _created(manifest: dict[str, Any]) -> float:
    created = manifest.get("created", 0.0)
    return float(created) if isinstance(created, (int, float)) else 0.0


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _lower_thread_priority() -> None:
    """Nice the writer thread (Linux niceness is per thread): steps and loader workers go first."""
    if sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


@dataclass(frozen=True)
class Candidate:
    """A checkpoint a start may resume from, and the lineage/origin its saves then continue."""

    url: str
    lineage: str
    origin: str | None


@dataclass(frozen=True)
class ResumeChoice:
    """What checkpoint.resume makes of the checkpoints in the folder, decided from their manifests alone.

    `candidates` are tried in order; the first that loads is resumed from. None loading: a fresh
    start, or, for an explicit URL (`explicit`) not taken before, that URL itself. `start_over`:
    the steps of an earlier run that resume=none with overwrite replaces.
    """

    candidates: tuple[Candidate, ...] = ()
    explicit: str | None = None
    start_over: tuple[int, ...] = ()


def choose_checkpoint(resume: str, overwrite: bool, valid: list[tuple[int, dict[str, Any]]], steps: list[int],
                      step_url: Callable[[int], str]) -> ResumeChoice:
    """The resume decision as a pure function of checkpoint.resume, checkpoint.overwrite, the complete
    checkpoints (step, manifest; the most recently written last) and every step folder present.

    auto: the complete checkpoints, newest first (past a corrupt one to the next). none: a fresh
    start; refused where checkpoints exist unless overwrite. A URL: at the first start that URL;
    at later starts (the same command again) the checkpoints this run saved since, newest first.
    """
    if resume == "none":
        if steps and not overwrite:
            raise CheckpointError(
                f"{step_url(steps[0]).rsplit('/', 1)[0]} already holds checkpoints and checkpoint.resume=none: set "
                "checkpoint.resume=auto to continue that run, or checkpoint.overwrite=true to start over"
            )
        return ResumeChoice(start_over=tuple(steps))
    if resume == "auto":
        return ResumeChoice(tuple(Candidate(step_url(s), m.get("lineage", ""), m.get("origin"))
                                  for s, m in reversed(valid)))
    origin = normalized_url(resume)
    own = [(s, m) for s, m in valid if m.get("origin") == origin]
    return ResumeChoice(tuple(Candidate(step_url(s), m.get("lineage", ""), origin) for s, m in reversed(own)),
                        explicit=resume)


class CheckpointStore:
    """Save, list, validate, load and prune the checkpoints of one run folder.

    Saves run in one background thread (at most one in flight); an error in a save is raised
    by the next call to `save` or `raise_pending`, and `wait` blocks until the last is done.
    """

    def __init__(self, folder: RunFolder, cfg: CheckpointConfig) -> None:
        self.folder = folder
        self.url = folder.checkpoints
        self.cfg = cfg
        self.storage = folder.storage
        self.fs, self.path = self.storage.url_to_fs(self.url)
        self._protected: set[int] = set()
        self._reported: set[str] = set()  # what removing left (not dist_kp's), warned about once
        # The lineage this run's saves belong to (chosen by `resolve`), and the checkpoint it branched from.
        self.lineage = ""
        self.origin: str | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint",
                                                           initializer=_lower_thread_priority)
        self._pending: concurrent.futures.Future | None = None

    def step_url(self, step: int) -> str:
        return self.folder.checkpoint(step)

    def _step_path(self, step: int) -> str:
        return self.storage.url_to_fs(self.step_url(step))[1]

    def protect(self, step: int) -> None:
        """Never prune this step (the checkpoint this run resumed from)."""
        self._protected.add(step)

    def steps(self) -> list[int]:
        """Steps that have a checkpoint folder (valid or not), oldest first."""
        return self.folder.checkpoint_steps()

    def write(self, step: int, state: dict[str, Any]) -> str:
        """Serialize and store one checkpoint, manifest last; then prune. Returns its URL."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getbuffer()  # no copy of a possibly large buffer
        folder = self._step_path(step)
        manifest = {"step": step, "epoch": state["progress"]["epoch"], "epoch_end": state["epoch_end"],
                    "created": time.time(), "lineage": self.lineage, "origin": self.origin,
                    "files": {STATE_FILE: {"size": len(data), "sha256": _sha256(data)}}}
        try:
            # The manifest goes last: until it is stored the folder is not a checkpoint.
            storage.write_file(self.fs, f"{folder}/{STATE_FILE}", data)
            storage.write_file(self.fs, f"{folder}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        except Exception as error:  # noqa: BLE001
            raise self.storage.explain(error, self.step_url(step)) from error
        self.prune()
        return self.step_url(step)

    def save(self, step: int, state: dict[str, Any], on_saved: SaveListener | None = None) -> None:
        """Write `state` (a CPU snapshot) in the background; rank 0 only.

        Waits for the save in flight first (at most one), raising its error as CheckpointError.
        `on_saved` is called from the writing thread once the checkpoint is stored.
        """
        self.wait()
        self._pending = self._pool.submit(self._write_logged, step, state, on_saved)

    def _write_logged(self, step: int, state: dict[str, Any], on_saved: SaveListener | None) -> str:
        started = time.perf_counter()
        url = self.write(step, state)
        log.info("checkpoint step %d saved to %s in %.1f s", step, url, time.perf_counter() - started)
        if on_saved is not None:
            on_saved(step, url)
        return url

    @property
    def in_flight(self) -> bool:
        """True while a background save is still writing."""
        return self._pending is not None and not self._pending.done()

    def raise_pending(self) -> None:
        """Raise the error of a finished background save, if any."""
        if self._pending is not None and self._pending.done():
            self.wait()

    @property
    def saving(self) -> bool:
        """A save is in flight."""
        return self._pending is not None and not self._pending.done()

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
            raise self.storage.explain(error, self.step_url(step)) from error
        return manifest

    def read(self, url: str) -> dict[str, Any]:
        """Load a checkpoint folder URL, verifying the manifest's sizes and sha256."""
        fs, folder = self.storage.url_to_fs(url.rstrip("/"))
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
            raise self.storage.explain(error, url) from error
        if len(data) != entry["size"] or _sha256(data) != entry["sha256"]:
            raise CheckpointError(f"{url}: {STATE_FILE} does not match its manifest (truncated or corrupt)")
        try:
            return load_untrusted(io.BytesIO(data))  # a checkpoint is untrusted input
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(f"{url}: refused to load ({type(error).__name__}: {error})") from None

    def _valid(self) -> list[tuple[int, dict[str, Any]]]:
        """(step, manifest) of every complete checkpoint, the most recently written last.

        Recency is the manifest's creation time, then the step: after a run branched from an
        earlier step (an explicit checkpoint.resume), its new checkpoints are the newest even
        where an older run reached higher steps.
        """
        valid = []
        for step in self.steps():
            manifest = self.manifest(step)
            if manifest is None:
                log.warning("skipping %s: partial checkpoint (no valid manifest)", self.step_url(step))
            else:
                valid.append((step, manifest))
        return sorted(valid, key=lambda item: (_created(item[1]), item[0]))

    def _first_loadable(self, candidates: list[tuple[int, dict[str, Any]]]) -> tuple[str, dict[str, Any]] | None:
        for step, _ in reversed(candidates):
            url = self.step_url(step)
            try:
                return url, self.read(url)
            except CheckpointError as error:
                log.warning("skipping %s: %s", url, error)
        return None

    def latest(self) -> tuple[str, dict[str, Any]] | None:
        """The most recently written checkpoint that loads, skipping (with a warning naming it) corrupt ones."""
        return self._first_loadable(self._valid())

    def prune(self) -> None:
        """Keep this lineage's newest `keep_last` checkpoints, the protected one and every K-th epoch end.

        Checkpoints of another lineage (an earlier run this one branched from) are never deleted
        here, and this lineage's newest checkpoints are never deleted to make room for them.
        Partial folders older than this lineage's newest checkpoint (left by a killed save) go too.
        Only the files a save writes are deleted (`_remove_checkpoint`); anything else stays, named in a warning.
        """
        steps = self.steps()
        manifests = {s: self.manifest(s) for s in steps}
        mine = sorted(((s, m) for s, m in manifests.items() if m is not None and m.get("lineage", "") == self.lineage),
                      key=lambda item: (_created(item[1]), item[0]))
        if not mine:
            return
        keep = {s for s, _ in mine[-self.cfg.keep_last:]} | self._protected
        if self.cfg.keep_every_epochs:
            keep |= {s for s, m in mine if m["epoch_end"] and m["epoch"] % self.cfg.keep_every_epochs == 0}
        newest = max(s for s, _ in mine)
        doomed = [s for s, _ in mine if s not in keep] + [s for s in steps if manifests[s] is None and s < newest]
        self._report_left("pruning", [url for step in sorted(doomed) for url in self._remove_checkpoint(step)])

    def _remove_checkpoint(self, step: int) -> list[str]:
        """Delete the files a save writes into the folder of `step`, the manifest first (then it is no
        checkpoint), and the folder once empty. Returns the URLs of anything else in it, which stays.
        """
        url, folder = self.step_url(step), self._step_path(step)
        names = self.folder.names(url)
        others = [name for name in names if name not in (MANIFEST, STATE_FILE)]
        with self.storage.named_errors(url):
            for name in (MANIFEST, STATE_FILE):
                if name in names:
                    self.fs.rm_file(f"{folder}/{name}")
            if not others and self.fs.exists(folder):
                storage.remove_empty_folder(self.fs, folder)
        return [f"{url}/{name}" for name in others]

    def _report_left(self, action: str, urls: list[str]) -> None:
        """One warning naming what `action` did not delete because dist_kp did not write it (each URL once)."""
        new = [url for url in urls if url not in self._reported]
        self._reported.update(new)
        if new:
            log.warning("%s left %d files or folders in %s that dist_kp did not write: %s", action, len(new),
                        self.url, some_of(new))

    def abort_unfinished_uploads(self) -> int:
        """Object stores: abort multipart uploads left under checkpoints/ by a killed or failed save.

        They are invisible (not checkpoints) but stored and billed. Call only while no save of
        this run is in flight (rank 0 at start). Returns how many were aborted.
        """
        if not hasattr(self.fs, "abort_mpu"):  # s3fs only
            return 0
        bucket, _, prefix = self.path.partition("/")
        with self.storage.named_errors(self.url):
            uploads = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=f"{prefix}/").get("Uploads", [])
            for upload in uploads:
                self.fs.abort_mpu(bucket, upload["Key"], upload["UploadId"])
        if uploads:
            log.info("aborted %d unfinished uploads under %s (left by an interrupted save)", len(uploads), self.url)
        return len(uploads)

    def resolve(self, resume: str) -> tuple[tuple[str, dict[str, Any]] | None, ResumeChoice]:
        """The checkpoint to resume from per checkpoint.resume (auto, none, or a URL); rank 0, at start.

        Lists the folder, decides (`choose_checkpoint`, no I/O), then loads the first candidate that
        loads. Deletes nothing: what `resume=none` replaces is in the choice, for the caller to
        remove (`remove_earlier`). The chosen checkpoint is protected from pruning for the rest of
        this run; this run's saves continue its lineage (or start a new one).
        """
        self.abort_unfinished_uploads()
        choice = choose_checkpoint(resume, self.cfg.overwrite, self._valid(), self.steps(), self.step_url)
        found = None
        for candidate in choice.candidates:
            try:
                found = candidate.url, self.read(candidate.url)
            except CheckpointError as error:
                log.warning("skipping %s: %s", candidate.url, error)
                continue
            self.lineage, self.origin = candidate.lineage, candidate.origin
            if choice.explicit is not None:
                log.info("checkpoint.resume=%s was taken by an earlier start of this run, which saved checkpoints "
                         "of its own: continuing from its newest, %s", choice.explicit, candidate.url)
            break
        if found is None and choice.explicit is not None:
            found = self._branch_from(choice.explicit)
        elif found is None:
            self.lineage = new_lineage()
        if found is not None:
            step = int(found[1]["progress"]["step"])
            if normalized_url(found[0]) == normalized_url(self.step_url(step)):
                self.protect(step)
        return found, choice

    def _branch_from(self, resume: str) -> tuple[str, dict[str, Any]]:
        """An explicit checkpoint URL at the first start of this run: loaded as given, a new lineage from it."""
        state = self.read(resume)
        self.lineage, self.origin = new_lineage(), normalized_url(resume)
        step = int(state["progress"]["step"])
        later = [s for s in self.steps() if s > step]
        if later:
            log.warning("resuming from %s (checkpoint.resume): the checkpoints of steps %s in %s belong to the run "
                        "that went on from there; they are kept but never resumed from automatically, and those "
                        "of the steps this run saves again are replaced", resume, later, self.url)
        return resume, state

    def remove_earlier(self, choice: ResumeChoice) -> None:
        """checkpoint.overwrite=true with resume=none: remove the earlier run's checkpoints (after the decision).

        Left in place, the old run's later steps would win every prune and the next resume. Only
        what its saves wrote goes (`_remove_checkpoint`); anything else in checkpoints/ stays,
        named in a warning.
        """
        if not choice.start_over:
            return
        log.warning("checkpoint.overwrite=true: deleting the %d checkpoints of the earlier run in %s",
                    len(choice.start_over), self.url)
        left = [url for step in choice.start_over for url in self._remove_checkpoint(step)]
        left += [f"{self.url}/{name}" for name in self.folder.names(self.url) if checkpoint_step(name) is None]
        self._report_left("checkpoint.overwrite=true", left)

    def close(self) -> None:
        """Wait for the save in flight (raising its error) and stop the writer thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
