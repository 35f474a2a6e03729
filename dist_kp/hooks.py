"""Periodic actions of the training loop, one class each: checkpoints, evaluation, final weights, preemption.

A hook is called on every rank, in the order the hooks were registered:

    before_train(trainer)   once, after resuming, before the first step of this process
    after_step(trainer)     after every optimizer step (trainer.progress is that step's)
    after_epoch(trainer)    after the last step of an epoch (progress.epoch is the next one)
    after_train(trainer)    once, at the end, also after a stop request (trainer.stop_reason)

Each hook owns its interval and reads only its own config section. Your own hook: a class
with these methods (subclass `Hook`), named in `train.hooks` as "module:Class"; it is built
with the run's config and registered after dist_kp's own hooks (tracking records it sees).
"""

from __future__ import annotations

import importlib
import io
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from dist_kp import distributed
from dist_kp.checkpoint import CheckpointStore, SaveListener
from dist_kp.config import CheckpointConfig, Config, ConfigError, EvalConfig
from dist_kp.preemption import PreemptionHandler
from dist_kp.run_folder import RunFolder
from dist_kp.run_state import RunState

if TYPE_CHECKING:
    from dist_kp.evaluation import EvalOutput
    from dist_kp.trainer import Trainer

log = logging.getLogger(__name__)

PREEMPTED = "preempted"


class Hook:
    """The hook protocol; every method does nothing unless overridden."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_epoch(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass


class CheckpointHook(Hook):
    """Checkpoint every `every_steps` steps, every `every_minutes`, at every epoch end and at the end.

    Saving is collective (rank 0 writes). For `every_minutes` rank 0's clock decides and one
    tiny all-reduce per step tells every rank, so that all of them save at the same step.
    """

    def __init__(self, store: CheckpointStore, state: RunState, cfg: CheckpointConfig,
                 on_started: SaveListener | None = None, on_saved: SaveListener | None = None) -> None:
        self.store = store
        self.state = state
        self.cfg = cfg
        self.on_started = on_started
        self.on_saved = on_saved
        self.last_saved_step = -1
        self.last_saved_time = time.monotonic()

    def _minutes_passed(self) -> bool:
        """True on every rank once every_minutes passed on rank 0 since the last save (a collective)."""
        if self.cfg.every_minutes is None:
            return False
        elapsed = time.monotonic() - self.last_saved_time
        return distributed.any_rank(distributed.is_main_process() and elapsed >= 60.0 * self.cfg.every_minutes)

    def save(self, trainer: Trainer, epoch_end: bool = False, wait: bool = False) -> None:
        """Checkpoint the current step (once per step); `wait` blocks until it is stored."""
        step = trainer.progress.step
        if step != self.last_saved_step:
            snapshot = self.state.capture(epoch_end)
            if distributed.is_main_process():
                self.store.save(step, snapshot, self.on_started, self.on_saved)
            self.last_saved_step = step
            self.last_saved_time = time.monotonic()
        if wait and distributed.is_main_process():
            self.store.wait()

    def before_train(self, trainer: Trainer) -> None:
        # The step resumed from is stored already.
        self.last_saved_step = trainer.progress.step if trainer.progress.step else -1
        self.last_saved_time = time.monotonic()

    def after_step(self, trainer: Trainer) -> None:
        if distributed.is_main_process():
            self.store.raise_pending()  # a failed background save stops training at the next step
        # An epoch's last step is saved next, as the epoch end (kept by keep_every_epochs), not here.
        due = trainer.progress.step % self.cfg.every_steps == 0 or self._minutes_passed()
        if due and not trainer.epoch_complete:
            self.save(trainer)

    def after_epoch(self, trainer: Trainer) -> None:
        self.save(trainer, epoch_end=True)

    def after_train(self, trainer: Trainer) -> None:
        self.save(trainer, wait=True)
        if distributed.is_main_process():
            self.store.close()


class EvaluationHook(Hook):
    """Evaluate every `eval.every_epochs` epochs and after the last step (`eval.at_end`)."""

    def __init__(self, cfg: EvalConfig, evaluate: Callable[[int], EvalOutput],
                 on_result: Callable[[int, EvalOutput], None]) -> None:
        self.cfg = cfg
        self.evaluate = evaluate
        self.on_result = on_result
        self.evaluated_at = -1

    def _run(self, step: int) -> None:
        self.on_result(step, self.evaluate(step))
        self.evaluated_at = step

    def after_epoch(self, trainer: Trainer) -> None:
        if self.cfg.every_epochs and trainer.progress.epoch % self.cfg.every_epochs == 0:
            self._run(trainer.progress.step)

    def after_train(self, trainer: Trainer) -> None:
        if trainer.stop_reason is None and self.cfg.at_end and self.evaluated_at != trainer.progress.step:
            self._run(trainer.progress.step)


class FinalWeightsHook(Hook):
    """At the end of training: check the replicas agree, then write OUTPUT_DIR/model_final.pt (rank 0)."""

    def __init__(self, folder: RunFolder, payload: Callable[[], dict[str, Any]]) -> None:
        self.folder = folder
        self.payload = payload

    def after_train(self, trainer: Trainer) -> None:
        if trainer.stop_reason is not None:
            return
        from dist_kp.trainer import check_replicas_identical

        check_replicas_identical(trainer.model)
        if distributed.is_main_process():
            buffer = io.BytesIO()
            torch.save(self.payload(), buffer)
            self.folder.write(self.folder.model_final, buffer.getbuffer())
            log.info("final weights written to %s", self.folder.model_final)


class PreemptionHook(Hook):
    """Stop at the step boundary after SIGUSR1/SIGTERM on any rank; at the end requeue the SLURM job."""

    def __init__(self, handler: PreemptionHandler) -> None:
        self.handler = handler
        self.exit_status = 0

    def before_train(self, trainer: Trainer) -> None:
        self.handler.install()

    def after_step(self, trainer: Trainer) -> None:
        if self.handler.should_stop():
            trainer.request_stop(PREEMPTED)

    def after_train(self, trainer: Trainer) -> None:
        if trainer.stop_reason == PREEMPTED:
            self.exit_status = self.handler.finish()


def user_hooks(cfg: Config) -> list[Hook]:
    """The hooks named in train.hooks ("module:Class"), each built with the config."""
    hooks = []
    for name in cfg.train.hooks:
        module, _, attribute = name.partition(":")
        try:
            hook_class = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError, ValueError) as error:
            raise ConfigError(f"train.hooks: cannot import {name!r} ({type(error).__name__}: {error})") from None
        hooks.append(hook_class(cfg))
    return hooks
