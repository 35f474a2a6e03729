"""What rank 0 records about a run: metrics.jsonl, pictures of predictions, and W&B.

    tracker = start_tracking(cfg, folder, run_state, run_id, index)   # every rank; a no-op off rank 0
    trainer.register(tracker)   # a hook: each logged step's record, each evaluation's AP summaries and
                                # prediction pictures, each checkpoint's URL; closes the W&B run at the end

W&B (`tracking.mode` online or offline) keeps one run per output_dir across restarts: the run
id is created once, written to OUTPUT_DIR/tracking.json and into every checkpoint, and every
restart (requeue, torchrun restart, the same command again) continues that run. The step axis
is the global step; steps already sent to W&B before a restart are not sent again, so the
run's history never holds a step twice or out of order. The API key comes from the
environment (WANDB_API_KEY) or `wandb login`, never from the config. A W&B failure is logged
once and training goes on without W&B. Prediction pictures are written as PNG files under
OUTPUT_DIR/eval/<step>/ whatever the mode, for `python -m dist_kp.report`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torchvision.io import encode_png

from dist_kp import distributed
from dist_kp.config import Config
from dist_kp.config.secrets import redact
from dist_kp.data.coco import build_target, read_image
from dist_kp.data.index import KeypointIndex
from dist_kp.data.loaders import join
from dist_kp.engine.checkpointer import Checkpointer
from dist_kp.engine.hooks import PREEMPTED, Hook
from dist_kp.storage.run_folder import EVAL_PICTURES, RunFolder
from dist_kp.tracking.metrics_file import MetricsFile
from dist_kp.tracking.pictures import pad_to, people_from_results, tile, truth_and_prediction

if TYPE_CHECKING:
    from dist_kp.engine.trainer import Trainer

log = logging.getLogger(__name__)

T = TypeVar("T")

# Predictions drawn in the pictures: the confident ones, as a user would filter them.
PICTURE_MIN_SCORE = 0.5


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    """sys.argv without secrets while W&B reads it (it records the command line of the run)."""
    argv = sys.argv
    sys.argv = [redact(a) for a in argv]
    try:
        yield
    finally:
        sys.argv = argv


class RunId:
    """The W&B run id, a part of the run state: every checkpoint carries it."""

    def __init__(self) -> None:
        self.value = ""

    def state_dict(self) -> dict[str, str]:
        return {"run_id": self.value}

    def load_state_dict(self, state: dict[str, str]) -> None:
        self.value = str(state.get("run_id", ""))


def last_logged_step(metrics: MetricsFile, folder: RunFolder) -> int:
    """The newest step a previous process of this run recorded (training records or evaluations).

    Records reach metrics.jsonl and eval/<step>/ before W&B, so W&B holds no step past this one.
    """
    steps = [int(r.get("step", 0)) for r in metrics.records]
    return max(steps + folder.eval_steps(), default=0)


def run_id_for(cfg: Config, folder: RunFolder, checkpoint_run_id: str, starts_over: bool) -> tuple[str, bool]:
    """This output_dir's W&B run id, and whether it continues an earlier run.

    From tracking.json, else the resumed checkpoint, else a new one (then written to
    tracking.json). A start over an old run (checkpoint.resume=none) gets a new run.
    """
    url = folder.tracking
    if not starts_over and folder.exists(url):
        with folder.storage.named_errors(url):
            run_id = json.loads(folder.read_bytes(url)).get("run_id", "")
        if run_id:
            return run_id, True
    run_id = "" if starts_over else checkpoint_run_id
    continued = bool(run_id)
    run_id = run_id or uuid.uuid4().hex[:16]
    record = {"run_id": run_id, "project": cfg.tracking.project, "entity": cfg.tracking.entity, "created": time.time()}
    folder.write(url, json.dumps(record, indent=1).encode())
    return run_id, continued


class NoTracking(Hook):
    """What ranks other than 0 get: every call does nothing."""

    run_id = ""

    def record(self, record: dict[str, Any]) -> None:
        pass

    def checkpoint_saved(self, step: int, url: str) -> None:
        pass

    def finish(self, preempted: bool = False) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        if trainer.log_record is not None:
            self.record(trainer.log_record)

    def after_train(self, trainer: Trainer) -> None:
        self.finish(preempted=trainer.stop_reason == PREEMPTED)


class Tracker(NoTracking):
    """Rank 0's tracker: metrics.jsonl, prediction pictures, and the W&B run when one is configured.

    Every W&B call is guarded: the first failure is logged once and W&B stays off afterwards.
    """

    def __init__(self, cfg: Config, metrics: MetricsFile, run_id: str = "", resume_after: int = 0,
                 index: KeypointIndex | None = None) -> None:
        self.cfg = cfg
        self.folder = metrics.folder
        self.index = index  # the validation index, for the pictures of predictions
        self.metrics = metrics
        self.run_id = run_id
        # Steps up to here were recorded (and perhaps sent to W&B) before this process started.
        self.resume_after = resume_after
        self.run: Any = None
        self._saved: list[tuple[int, str]] = []
        self._saved_lock = threading.Lock()  # the checkpoint thread adds, this one takes
        self._skipped_logged = False
        if run_id and cfg.tracking.mode != "disabled":
            self.run = self._guard("init", self._init)

    def _init(self) -> Any:
        import wandb

        t = self.cfg.tracking
        # WANDB_MODE, when set, wins over the config, as W&B users expect (offline on nodes without internet).
        mode = os.environ.get("WANDB_MODE") or t.mode
        config = redact(self.cfg.model_dump(mode="json"))
        config["world_size"] = distributed.get_world_size()
        with redacted_argv():
            run = wandb.init(
                id=self.run_id, resume="allow", mode=mode, project=t.project, entity=t.entity,
                name=redact(t.name or self.folder.url.rsplit("/", 1)[-1]), group=redact(t.group),
                tags=redact(t.tags) or None, notes=redact(t.notes), job_type="train", config=config,
            )
        log.info("W&B run %s (%s, project %s)%s", self.run_id, mode, t.project,
                 f", resuming after step {self.resume_after}" if self.resume_after else "")
        return run

    def _guard(self, action: str, call: Callable[[], T]) -> T | None:
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - no W&B problem may stop training
            log.warning("W&B %s failed (%s: %s); training goes on without W&B for the rest of this run",
                        action, type(error).__name__, error)
            self.run = None
            return None

    def _log(self, data: dict[str, Any], step: int) -> None:
        self._newest_stored()
        if self.run is None:
            return
        if step <= self.resume_after:
            if not self._skipped_logged:
                log.info("steps up to %d were recorded before the restart; not sending them again to W&B",
                         self.resume_after)
                self._skipped_logged = True
            return
        self._guard("log", lambda: self.run.log(data, step=step))

    def _newest_stored(self) -> tuple[int, str] | None:
        """The newest checkpoint stored since the last call (told by the checkpoint thread), now in the summary."""
        with self._saved_lock:
            saved, self._saved = self._saved, []
        if not saved:
            return None
        step, url = saved[-1]
        if self.run is not None:
            self._guard("summary", lambda: self.run.summary.update({"checkpoint/step": step, "checkpoint/url": url}))
        return step, url

    def record(self, record: dict[str, Any]) -> None:
        """A training record (step, lr, train/<loss>, images_per_s, ...): metrics.jsonl first, then W&B."""
        self.metrics.append(record)
        self._log({k: v for k, v in record.items() if k != "step"}, int(record["step"]))

    def after_checkpoint(self, trainer: Trainer, url: str) -> None:
        """A checkpoint of this step is being written: its URL goes into the step's row (a reference, not an upload).

        Logged at hand-off, not when the upload ends, so that every checkpoint has its row even when
        several uploads end between two logged steps.
        """
        step = trainer.progress.step
        self.metrics.checkpoint_started(step)
        self._log({"checkpoint/step": step, "checkpoint/url": url}, step)

    def checkpoint_saved(self, step: int, url: str) -> None:
        """Note a stored checkpoint (called from the checkpoint thread); its URL goes to W&B, not its bytes."""
        with self._saved_lock:
            self._saved.append((step, url))

    def after_evaluation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """AP summaries to W&B; pictures of a fixed set of validation images to PNG (and W&B)."""
        step = trainer.progress.step
        results = trainer.evaluation.results if trainer.evaluation is not None else None
        pictures = self._pictures(step, results or [], self.index) if self.index is not None else []
        data: dict[str, Any] = dict(metrics)
        if pictures and self.run is not None:
            import wandb

            # W&B shows the images of one key in a strip: they must share one size.
            height, width = max(p.shape[1] for _, p in pictures), max(p.shape[2] for _, p in pictures)
            data["predictions"] = [wandb.Image(pad_to(p, height, width).permute(1, 2, 0).numpy(), caption=caption)
                                   for caption, p in pictures]
        self._log(data, step)

    def _pictures(self, step: int, results: list[dict[str, Any]], index: KeypointIndex) -> list[tuple[str, torch.Tensor]]:
        """Ground truth next to prediction for the first eval.num_visualize annotated validation images."""
        count = self.cfg.eval.num_visualize
        if count == 0:
            return []
        evaluated = len(index) if self.cfg.eval.max_images is None else min(self.cfg.eval.max_images, len(index))
        positions = [i for i in range(evaluated) if index.ann_offsets[i + 1] > index.ann_offsets[i]][:count]
        image_root = join(self.cfg.data.root, self.cfg.data.val_images)
        url = self.folder.eval_file(step, EVAL_PICTURES)
        try:
            pictures = []
            for i in positions:
                image_id = int(index.image_ids[i])
                truth = build_target(index, i, train=False)
                prediction = people_from_results([r for r in results if r["image_id"] == image_id],
                                                 index.meta.num_keypoints, PICTURE_MIN_SCORE)
                image = read_image(f"{image_root}/{index.file_names[i]}", self.folder.storage)
                pictures.append((f"image {image_id}",
                                 truth_and_prediction(image, truth, prediction, index.meta.skeleton,
                                                      f"image {image_id}")))
            if pictures:
                self.folder.write(url, encode_png(tile([p for _, p in pictures], columns=1)).numpy().tobytes())
            return pictures
        except Exception as error:  # noqa: BLE001 - pictures are a view of the run, never a reason to stop it
            log.warning("prediction pictures for step %d not drawn: %s: %s", step, type(error).__name__, error)
            return []

    def finish(self, preempted: bool = False) -> None:
        """Store the waiting records; close the W&B run (marked preempting when the job stops to be requeued)."""
        self.metrics.flush()
        newest = self._newest_stored()
        if self.run is None:
            return
        if preempted:
            self._guard("mark_preempting", self.run.mark_preempting)
        if self.run is not None:
            with redacted_argv():
                self._guard("finish", self.run.finish)
        self.run = None
        if newest:
            log.info("W&B run %s closed; newest checkpoint %s", self.run_id, newest[1])


def start_tracking(cfg: Config, folder: RunFolder, checkpointer: Checkpointer, run_id: RunId,
                   index: KeypointIndex | None = None) -> NoTracking:
    """Rank 0 gets a Tracker, other ranks NoTracking. Call after resuming (`run_id` then holds the checkpoint's).

    The W&B run id goes into `run_id`, a part of the run state, so that every checkpoint from
    now on carries it. Records past the resumed step (or of a start killed before its first
    checkpoint) are dropped from metrics.jsonl: this run records those steps again.
    """
    if not distributed.is_main_process():
        return NoTracking()
    metrics = MetricsFile(folder)
    resumed_step = checkpointer.resumed.step if checkpointer.resumed else 0
    if cfg.tracking.mode == "disabled":
        tracker = Tracker(cfg, metrics, index=index)
    else:
        run_id.value, continued = run_id_for(cfg, folder, run_id.value, checkpointer.starts_over)
        tracker = Tracker(cfg, metrics, run_id.value, last_logged_step(metrics, folder) if continued else 0, index)
    metrics.truncate_after(resumed_step)
    return tracker
