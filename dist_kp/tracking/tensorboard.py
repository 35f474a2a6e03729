"""TensorBoard event files of a run (`tracking.tensorboard`), next to metrics.jsonl and W&B, on rank 0.

    tensorboard = start_tensorboard(cfg, folder)    # every rank; a no-op off rank 0 or when off
    trainer.register(tensorboard)                   # a hook: each logged step's record and each
                                                    # evaluation's metrics (after_evaluation) as scalars

The scalars are the ones W&B gets: every number of a training record (losses, lr, throughput)
and of an evaluation (kp/AP, bbox/AP, ...), on the global step axis. Event files go to
OUTPUT_DIR/tensorboard/ directly on a local disk; for an object-store output_dir they are
written to a local folder and uploaded whole at every checkpoint interval, epoch end and at
the end. A restarted run writes a new event file whose purge step hides the steps it records
again. Any failure is logged once and TensorBoard stays off for the rest of the run: it never
stops training.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_kp import distributed
from dist_kp.config import Config
from dist_kp.engine.hooks import Hook
from dist_kp.storage import is_local_url, local_path
from dist_kp.storage.run_folder import RunFolder

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from dist_kp.engine.trainer import Trainer

log = logging.getLogger(__name__)


class NoTensorBoard(Hook):
    """What ranks other than 0 get, and every rank when tracking.tensorboard is off."""


class TensorBoardSink(NoTensorBoard):
    """Rank 0's event files under OUTPUT_DIR/tensorboard/ (a local folder uploaded there for an object store)."""

    def __init__(self, folder: RunFolder, sync_every_steps: int) -> None:
        self.folder = folder
        self.sync_every_steps = sync_every_steps
        self.remote = not is_local_url(folder.url)
        self.logdir = Path(tempfile.mkdtemp(prefix="dist_kp-tensorboard-") if self.remote
                           else local_path(folder.tensorboard))
        self.writer: SummaryWriter | None = None
        self._uploaded: dict[str, int] = {}  # event file name -> size at its last upload

    def _guard(self, action: str, call: Callable[[], Any]) -> None:
        if self.writer is None:
            return
        try:
            call()
        except Exception as error:  # noqa: BLE001 - no TensorBoard problem may stop training
            log.warning("TensorBoard %s failed (%s: %s); training goes on without TensorBoard for the rest of this "
                        "run", action, type(error).__name__, error)
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except Exception:  # noqa: BLE001, S110 - already reported above; the writer is dropped either way
                pass

    def _scalars(self, data: dict[str, Any], step: int) -> None:
        for name, value in data.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
                self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a failing disk shows here, at this step, not in a background thread later

    def _sync(self) -> None:
        """Upload the event files that grew since their last upload (object-store output_dir only)."""
        self.writer.flush()
        for path in sorted(self.logdir.iterdir()):
            size = path.stat().st_size
            if self._uploaded.get(path.name) != size:
                self.folder.write(f"{self.folder.tensorboard}/{path.name}", path.read_bytes())
                self._uploaded[path.name] = size

    def before_train(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        step = trainer.progress.step
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
            # On resume, TensorBoard hides what earlier files hold from this step on: this run records it again.
            self.writer = SummaryWriter(str(self.logdir), purge_step=step + 1 if step else None)
        except Exception as error:  # noqa: BLE001 - no TensorBoard problem may stop training
            log.warning("TensorBoard start failed (%s: %s); training goes on without TensorBoard",
                        type(error).__name__, error)
            return
        log.info("TensorBoard event files in %s%s", self.logdir,
                 f", uploaded to {self.folder.tensorboard}" if self.remote else "")

    def after_step(self, trainer: Trainer) -> None:
        if trainer.log_record is not None:
            self._guard("write", lambda: self._scalars(trainer.log_record, trainer.progress.step))
        if self.remote and trainer.progress.step % self.sync_every_steps == 0:
            self._guard("upload", self._sync)

    def after_epoch(self, trainer: Trainer) -> None:
        if self.remote:
            self._guard("upload", self._sync)

    def after_evaluation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._guard("write", lambda: self._scalars(dict(metrics), trainer.progress.step))

    def after_train(self, trainer: Trainer) -> None:
        if self.remote:
            self._guard("upload", self._sync)
        self._guard("close", lambda: self.writer.close())
        self.writer = None
        if self.remote:
            shutil.rmtree(self.logdir, ignore_errors=True)


def start_tensorboard(cfg: Config, folder: RunFolder) -> NoTensorBoard:
    """Rank 0 gets a TensorBoardSink when tracking.tensorboard is on; everyone else a no-op."""
    if not (cfg.tracking.tensorboard and distributed.is_main_process()):
        return NoTensorBoard()
    return TensorBoardSink(folder, cfg.checkpoint.every_steps)
