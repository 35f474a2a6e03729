"""Periodic actions of the training loop, one class each: checkpoints, evaluation, weights files, stopping.

A hook is called on every rank, in the order the hooks were registered:

    before_train(trainer)                 once, after resuming, before the first step of this process
    after_step(trainer)                   after every optimizer step (trainer.progress is that step's)
    after_epoch(trainer)                  after the last step of an epoch (progress.epoch is the next one)
    after_evaluation(trainer, metrics)    after an evaluation: the merged stats ("kp/AP", "bbox/AP", ...),
                                          the same dict on every rank (trainer.evaluation has the rest)
    after_checkpoint(trainer, url)        a checkpoint of this step was taken: rank 0 stores it at `url` in
                                          the background (valid once its manifest is written)
    after_train(trainer)                  once, at the end, also after a stop request (trainer.stop_reason)

A hook that also has `state_dict()` / `load_state_dict(state)` is saved in every checkpoint and
restored on resume before `before_train` (a checkpoint without its state leaves it fresh).
Each hook owns its interval and reads only its own config section. Your own hook: subclass
`dist_kp.Hook`, name it in `train.hooks` as "module:Class"; it is built with the run's config and
registered after dist_kp's own hooks (it sees what they recorded).
"""

from __future__ import annotations

import importlib
import io
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from dist_kp import distributed
from dist_kp.config import CheckpointConfig, Config, ConfigError, EarlyStopConfig, EvalConfig, ModelConfig
from dist_kp.distributed.preemption import PreemptionHandler
from dist_kp.engine.checkpoint import SaveListener
from dist_kp.engine.checkpointer import Checkpointer
from dist_kp.model.ema import ModelEMA
from dist_kp.model.keypoint_rcnn import weights_payload
from dist_kp.storage.run_folder import RunFolder

if TYPE_CHECKING:
    from dist_kp.engine.trainer import Trainer
    from dist_kp.evaluation.evaluator import EvalOutput

log = logging.getLogger(__name__)

PREEMPTED = "preempted"
EARLY_STOP = "early stop"


class Hook:
    """The hook protocol; every method does nothing unless overridden (see the module's docstring)."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_epoch(self, trainer: Trainer) -> None:
        pass

    def after_evaluation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        pass

    def after_checkpoint(self, trainer: Trainer, url: str) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass


def has_state(hook: Hook) -> bool:
    """True for a hook whose state is saved in checkpoints (it has state_dict and load_state_dict)."""
    return callable(getattr(hook, "state_dict", None)) and callable(getattr(hook, "load_state_dict", None))


class CheckpointHook(Hook):
    """Checkpoint every `every_steps` steps, every `every_minutes`, at every epoch end and at the end.

    Saving is collective (rank 0 writes). For `every_minutes` rank 0's clock decides and one
    tiny all-reduce per step tells every rank, so that all of them save at the same step.
    """

    def __init__(self, checkpointer: Checkpointer, cfg: CheckpointConfig, on_saved: SaveListener | None = None) -> None:
        self.checkpointer = checkpointer
        self.cfg = cfg
        self.on_saved = on_saved  # called from the writing thread once a checkpoint is stored
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
            self.checkpointer.save(step, epoch_end, on_saved=self.on_saved)
            self.last_saved_step = step
            self.last_saved_time = time.monotonic()
            trainer.emit("after_checkpoint", self.checkpointer.url(step))
        if wait:
            self.checkpointer.wait()

    def before_train(self, trainer: Trainer) -> None:
        # The step resumed from is stored already.
        self.last_saved_step = trainer.progress.step if trainer.progress.step else -1
        self.last_saved_time = time.monotonic()

    def after_step(self, trainer: Trainer) -> None:
        self.checkpointer.raise_pending()  # a failed background save stops training at the next step
        # An epoch's last step is saved next, as the epoch end (kept by keep_every_epochs), not here.
        due = trainer.progress.step % self.cfg.every_steps == 0 or self._minutes_passed()
        if due and not trainer.epoch_complete:
            self.save(trainer)

    def after_epoch(self, trainer: Trainer) -> None:
        self.save(trainer, epoch_end=True)

    def after_train(self, trainer: Trainer) -> None:
        self.save(trainer, wait=True)
        self.checkpointer.close()


class EMAHook(Hook):
    """train.ema: average the weights after every optimizer step (dist_kp.model.ema); the average is in
    every checkpoint, and the evaluation and weights-file hooks given it use it instead of the weights.

    Registered before the checkpoint hook, so that the checkpoint of step N holds the average of
    step N. A run resumed from a checkpoint that holds no average (written with train.ema off)
    starts it from the resumed weights.
    """

    def __init__(self, ema: ModelEMA) -> None:
        self.ema = ema
        self.restored = False

    def before_train(self, trainer: Trainer) -> None:
        step = trainer.progress.step
        if step and not self.restored:
            self.ema.restart()
            if distributed.is_main_process():
                log.info("train.ema: the checkpoint resumed from holds no EMA of the weights (written with train.ema "
                         "off): the average starts from the weights of step %d", step)
        if distributed.is_main_process():
            log.info("train.ema: evaluation, model_final.pt and model_best.pt use the %s", self.ema.describe())

    def after_step(self, trainer: Trainer) -> None:
        self.ema.update()

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state)
        self.restored = True


def weights_in_use(trainer: Trainer, ema: ModelEMA | None) -> torch.nn.Module:
    """The model that is evaluated and written to weights files: the EMA of the weights when there is one."""
    return ema.module if ema is not None else trainer.model


class Evaluates(Protocol):
    """What the evaluation hook runs (dist_kp.evaluation.evaluator.Evaluator): a collective on every rank."""

    def run(self, model: torch.nn.Module, step: int, ema: bool = False) -> EvalOutput: ...


class EvaluationHook(Hook):
    """Evaluate every `eval.every_epochs` epochs and after the last step (`eval.at_end`).

    The result goes to every hook's `after_evaluation` (the metrics) and to `trainer.evaluation`.
    An epoch's end is checkpointed before its evaluation runs (a stop signal during a long
    evaluation then loses no training); the step last evaluated is this hook's state, so a run
    resumed from such a checkpoint runs that evaluation first. With `ema` (train.ema) the EMA of the
    weights is evaluated; the metrics keep their names.
    """

    def __init__(self, cfg: EvalConfig, evaluator: Evaluates, ema: ModelEMA | None = None) -> None:
        self.cfg = cfg
        self.evaluator = evaluator
        self.ema = ema
        self.evaluated_at = -1

    def _run(self, trainer: Trainer) -> None:
        step = trainer.progress.step
        trainer.evaluation = self.evaluator.run(weights_in_use(trainer, self.ema), step, ema=self.ema is not None)
        self.evaluated_at = step
        trainer.emit("after_evaluation", trainer.evaluation.metrics)

    def _due_at_epoch_end(self, trainer: Trainer) -> bool:
        return bool(self.cfg.every_epochs) and trainer.progress.epoch % self.cfg.every_epochs == 0

    def before_train(self, trainer: Trainer) -> None:
        p = trainer.progress
        at_epoch_end = p.step > 0 and p.batch == 0
        if at_epoch_end and self._due_at_epoch_end(trainer) and self.evaluated_at != p.step:
            if distributed.is_main_process():
                log.info("the evaluation of step %d did not run before the checkpoint resumed from: running it now",
                         p.step)
            self._run(trainer)

    def after_epoch(self, trainer: Trainer) -> None:
        if self._due_at_epoch_end(trainer):
            self._run(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if trainer.stop_reason is None and self.cfg.at_end and self.evaluated_at != trainer.progress.step:
            self._run(trainer)

    def state_dict(self) -> dict[str, int]:
        return {"evaluated_at": self.evaluated_at}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.evaluated_at = int(state["evaluated_at"])


def _weights_file(trainer: Trainer, ema: ModelEMA | None, model_cfg: ModelConfig, meta: dict[str, Any],
                  **extra: Any) -> bytes:
    """The bytes of an inference weights file (model_final.pt's format) of the weights in use; it records
    "ema": true (with the decay, warmup and update count) for the EMA of the weights, else "ema": false."""
    record = ema.file_record() if ema is not None else {"ema": False}
    buffer = io.BytesIO()
    torch.save({**weights_payload(weights_in_use(trainer, ema), model_cfg, meta), **record, **extra}, buffer)
    return buffer.getvalue()


def describe_weights(ema: ModelEMA | None) -> str:
    """Which weights a file holds, for the log."""
    return ema.describe() if ema is not None else "the trained weights (train.ema off)"


class FinalWeightsHook(Hook):
    """At the end of training: check the replicas agree, then write OUTPUT_DIR/model_final.pt (rank 0).

    Not after a preemption (the run goes on later); after an early stop it is the run's end.
    With `ema` (train.ema) the file holds the EMA of the weights.
    """

    def __init__(self, folder: RunFolder, model_cfg: ModelConfig, meta: dict[str, Any],
                 ema: ModelEMA | None = None) -> None:
        self.folder = folder
        self.model_cfg = model_cfg
        self.meta = meta
        self.ema = ema

    def after_train(self, trainer: Trainer) -> None:
        if trainer.stop_reason == PREEMPTED:
            return
        distributed.check_replicas_identical(trainer.model)
        if self.ema is not None:
            distributed.check_replicas_identical(self.ema.module)
        if distributed.is_main_process():
            self.folder.write(self.folder.model_final, _weights_file(trainer, self.ema, self.model_cfg, self.meta))
            log.info("final weights written to %s: %s", self.folder.model_final, describe_weights(self.ema))


def improved(value: float, best: float | None, mode: Literal["max", "min"]) -> bool:
    """True when `value` beats `best` (None: nothing yet) in direction `mode`; NaN never does."""
    if math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def metric_of(metrics: dict[str, float], key: str, option: str) -> float:
    """The value of `key` in an evaluation's metrics; an unknown key is refused naming the option and the keys."""
    if key not in metrics:
        raise ConfigError(f"{option}: no metric {key!r} in the evaluation; it has {', '.join(sorted(metrics))}")
    return float(metrics[key])


class BestWeightsHook(Hook):
    """checkpoint.keep_best: OUTPUT_DIR/model_best.pt whenever an evaluation beats the best so far.

    The file is model_final.pt's format plus "best": {"metric", "value", "step"}; the best so far
    is this hook's state, so it survives resume (an evaluation the checkpoint did not see yet is
    run again on resume, see EvaluationHook, so the state never misses one). With `ema`
    (train.ema) the file holds the EMA of the weights, the one that was evaluated.
    """

    def __init__(self, folder: RunFolder, metric: str, mode: Literal["max", "min"], model_cfg: ModelConfig,
                 meta: dict[str, Any], ema: ModelEMA | None = None) -> None:
        self.folder = folder
        self.metric = metric
        self.mode = mode
        self.model_cfg = model_cfg
        self.meta = meta
        self.ema = ema
        self.best: dict[str, Any] | None = None

    def after_evaluation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = metric_of(metrics, self.metric, "checkpoint.keep_best")
        if not improved(value, self.best["value"] if self.best else None, self.mode):
            return
        self.best = {"metric": self.metric, "value": value, "step": trainer.progress.step}
        if distributed.is_main_process():
            self.folder.write(self.folder.model_best, _weights_file(trainer, self.ema, self.model_cfg, self.meta,
                                                                    best=dict(self.best)))
            log.info("best %s so far: %.4f at step %d, written to %s: %s", self.metric, value, trainer.progress.step,
                     self.folder.model_best, describe_weights(self.ema))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]


class EarlyStopHook(Hook):
    """train.early_stop: stop after `patience` evaluations in a row without a better `metric`.

    Every rank sees the same metrics, so every rank stops at the same step. The count is this
    hook's state: a resumed run that had run out of patience stops at once.
    """

    def __init__(self, cfg: EarlyStopConfig) -> None:
        self.cfg = cfg
        self.best: float | None = None
        self.without_improvement = 0

    def _stop_if_patience_ran_out(self, trainer: Trainer) -> None:
        if self.without_improvement >= self.cfg.patience:
            trainer.request_stop(EARLY_STOP)
            if distributed.is_main_process():
                log.info("early stop at step %d: %s did not improve on %.4f for %d evaluations",
                         trainer.progress.step, self.cfg.metric, self.best, self.without_improvement)

    def before_train(self, trainer: Trainer) -> None:
        self._stop_if_patience_ran_out(trainer)

    def after_evaluation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        value = metric_of(metrics, self.cfg.metric, "train.early_stop.metric")
        if improved(value, self.best, self.cfg.mode):
            self.best, self.without_improvement = value, 0
        else:
            self.without_improvement += 1
        self._stop_if_patience_ran_out(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "without_improvement": self.without_improvement}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.without_improvement = state["best"], int(state["without_improvement"])


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
    """The hooks named in train.hooks ("module:Class"), each a Hook subclass built with the config."""
    hooks = []
    for name in cfg.train.hooks:
        module, _, attribute = name.partition(":")
        try:
            hook_class = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError, ValueError) as error:
            raise ConfigError(f"train.hooks: cannot import {name!r} ({type(error).__name__}: {error})") from None
        if not (isinstance(hook_class, type) and issubclass(hook_class, Hook)):
            raise ConfigError(f"train.hooks: {name!r} is not a hook class (a subclass of dist_kp.Hook), it is "
                              f"{type(hook_class).__name__} {hook_class!r}")
        hooks.append(hook_class(cfg))
    return hooks
