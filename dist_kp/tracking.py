"""What rank 0 records about a run: metrics.jsonl, pictures of predictions, and W&B.

    tracker = start_tracking(cfg, train_state, metrics)   # every rank; a no-op off rank 0
    tracker.record(record)                  # a training record: metrics.jsonl, then W&B
    tracker.evaluation(step, output, index)  # AP summaries and prediction pictures
    tracker.finish()

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
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torchvision.io import encode_png

from dist_kp import distributed, storage
from dist_kp.checkpoint import TrainState
from dist_kp.config import Config
from dist_kp.data.coco import KeypointIndex, build_target, read_image
from dist_kp.data.loaders import join
from dist_kp.evaluation import EvalOutput
from dist_kp.metrics import MetricsFile
from dist_kp.report import PICTURES_FILE
from dist_kp.visualize import pad_to, people_from_results, tile, truth_and_prediction

log = logging.getLogger(__name__)

T = TypeVar("T")

RUN_FILE = "tracking.json"
# Predictions drawn in the pictures: the confident ones, as a user would filter them.
PICTURE_MIN_SCORE = 0.5
SECRET_NAME = re.compile(r"secret|passw|token|api_?key|access_?key|credential|signature|auth", re.IGNORECASE)
URL_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s]+@")
URL_QUERY = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^?\s]*)\?\S*")


def redact(value: Any) -> Any:
    """A copy without secrets: values of secret-looking keys, URL user:password@ and URL query strings."""
    if isinstance(value, dict):
        return {k: "<redacted>" if SECRET_NAME.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return URL_QUERY.sub(r"\1?<redacted>", URL_USERINFO.sub(r"\1<redacted>@", value))
    return value


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    """sys.argv without secrets while W&B reads it (it records the command line of the run)."""
    argv = sys.argv
    sys.argv = [redact(a) for a in argv]
    try:
        yield
    finally:
        sys.argv = argv


def last_logged_step(metrics: MetricsFile, output_dir: str) -> int:
    """The newest step a previous process of this run recorded (training records or evaluations).

    Records reach metrics.jsonl and eval/<step>/ before W&B, so W&B holds no step past this one.
    """
    steps = [int(r.get("step", 0)) for r in metrics.records]
    fs, path = storage.url_to_fs(f"{output_dir.rstrip('/')}/eval")
    with storage.named_errors(f"{output_dir.rstrip('/')}/eval"):
        if fs.exists(path):
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
            steps += [int(n) for n in names if n.isdigit()]
    return max(steps, default=0)


def run_id_for(cfg: Config, checkpoint_run_id: str) -> tuple[str, bool]:
    """This output_dir's W&B run id, and whether it continues an earlier run.

    From tracking.json, else the resumed checkpoint, else a new one (then written to
    tracking.json). A fresh start over an old run (checkpoint.resume=none with overwrite) gets
    a new run.
    """
    url = f"{cfg.output_dir.rstrip('/')}/{RUN_FILE}"
    fs, path = storage.url_to_fs(url)
    fresh = cfg.checkpoint.resume == "none" and cfg.checkpoint.overwrite
    with storage.named_errors(url):
        if not fresh and fs.exists(path):
            with fs.open(path, "r") as f:
                run_id = json.load(f).get("run_id", "")
            if run_id:
                return run_id, True
        run_id = "" if fresh else checkpoint_run_id
        continued = bool(run_id)
        run_id = run_id or uuid.uuid4().hex[:16]
        fs.makedirs(fs._parent(path), exist_ok=True)
        with fs.open(path, "w") as f:
            json.dump({"run_id": run_id, "project": cfg.tracking.project, "entity": cfg.tracking.entity,
                       "created": time.time()}, f, indent=1)
    return run_id, continued


class NoTracking:
    """What ranks other than 0 get: every call does nothing."""

    run_id = ""

    def record(self, record: dict[str, Any]) -> None:
        pass

    def evaluation(self, step: int, output: EvalOutput, index: KeypointIndex) -> None:
        pass

    def checkpoint_started(self, step: int, url: str) -> None:
        pass

    def checkpoint_saved(self, step: int, url: str) -> None:
        pass

    def finish(self, preempted: bool = False) -> None:
        pass


class Tracker(NoTracking):
    """Rank 0's tracker: metrics.jsonl, prediction pictures, and the W&B run when one is configured.

    Every W&B call is guarded: the first failure is logged once and W&B stays off afterwards.
    """

    def __init__(self, cfg: Config, metrics: MetricsFile, run_id: str = "", resume_after: int = 0) -> None:
        self.cfg = cfg
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
                name=t.name or self.cfg.output_dir.rstrip("/").rsplit("/", 1)[-1], group=t.group,
                tags=t.tags or None, notes=t.notes, job_type="train", config=config,
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

    def checkpoint_started(self, step: int, url: str) -> None:
        """A checkpoint of `step` is being written: its URL goes into that step's row (a reference, not an upload).

        Logged at hand-off, not when the upload ends, so that every checkpoint has its row even when
        several uploads end between two logged steps.
        """
        self._log({"checkpoint/step": step, "checkpoint/url": url}, step)

    def checkpoint_saved(self, step: int, url: str) -> None:
        """Note a stored checkpoint (called from the checkpoint thread); its URL goes to W&B, not its bytes."""
        with self._saved_lock:
            self._saved.append((step, url))

    def evaluation(self, step: int, output: EvalOutput, index: KeypointIndex) -> None:
        """AP summaries to W&B; pictures of a fixed set of validation images to PNG (and W&B)."""
        pictures = self._pictures(step, output.results or [], index)
        data: dict[str, Any] = dict(output.metrics)
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
        url = f"{self.cfg.output_dir.rstrip('/')}/eval/{step:08d}/{PICTURES_FILE}"
        try:
            pictures = []
            for i in positions:
                image_id = int(index.image_ids[i])
                truth = build_target(index, i, train=False)
                prediction = people_from_results([r for r in results if r["image_id"] == image_id],
                                                 index.meta.num_keypoints, PICTURE_MIN_SCORE)
                image = read_image(f"{image_root}/{index.file_names[i]}")
                pictures.append((f"image {image_id}",
                                 truth_and_prediction(image, truth, prediction, index.meta.skeleton,
                                                      f"image {image_id}")))
            if pictures:
                with storage.named_errors(url):
                    fs, path = storage.url_to_fs(url)
                    fs.makedirs(fs._parent(path), exist_ok=True)
                    with fs.open(path, "wb") as f:
                        f.write(encode_png(tile([p for _, p in pictures], columns=1)).numpy().tobytes())
            return pictures
        except Exception as error:  # noqa: BLE001 - pictures are a view of the run, never a reason to stop it
            log.warning("prediction pictures for step %d not drawn: %s: %s", step, type(error).__name__, error)
            return []

    def finish(self, preempted: bool = False) -> None:
        """Close the W&B run (marked preempting when the job stops to be requeued)."""
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


def start_tracking(cfg: Config, train_state: TrainState, metrics: MetricsFile | None) -> NoTracking:
    """Rank 0 gets a Tracker, other ranks NoTracking. Call after resuming, before metrics.truncate_after.

    The W&B run id goes into `train_state`, so that every checkpoint from now on carries it.
    """
    if not distributed.is_main_process() or metrics is None:
        return NoTracking()
    if cfg.tracking.mode == "disabled":
        return Tracker(cfg, metrics)
    run_id, continued = run_id_for(cfg, train_state.tracking_run_id)
    train_state.tracking_run_id = run_id
    return Tracker(cfg, metrics, run_id, last_logged_step(metrics, cfg.output_dir) if continued else 0)
