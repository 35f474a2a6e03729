"""Train Keypoint R-CNN, alone or as one worker of torchrun / srun.

usage:
  dist-kp train --config CONFIG.yaml [section.key=value ...]     (python -m dist_kp.train: the same)
  torchrun --nproc_per_node=4 -m dist_kp.train --config CONFIG.yaml [section.key=value ...]

Overrides are dotted keys with YAML values, e.g. optim.lr=0.01 train.epochs=2
output_dir=s3://bucket/runs/exp1. The resolved config is written to OUTPUT_DIR/config.yaml.
Running the same command again resumes from the newest valid checkpoint in OUTPUT_DIR
(checkpoint.resume=auto), mid-epoch, with the same data order and random state.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import random
import sys
from collections.abc import Iterator

import numpy as np
import torch

from dist_kp import distributed, storage
from dist_kp.cli import as_process
from dist_kp.config import Config, ConfigError, config_to_yaml, load_config, sections_help
from dist_kp.config.fingerprint import config_fingerprint
from dist_kp.data.fingerprint import data_fingerprint
from dist_kp.data.flip_pairs import FlipPairs, training_flip_pairs
from dist_kp.data.device_batches import DeviceBatches
from dist_kp.data.index import DataError, KeypointIndex
from dist_kp.data.index_cache import CachedKeypointIndex
from dist_kp.data.loaders import build_train_loader, train_index, val_index, with_skeleton_defaults
from dist_kp.data.sampler import BatchSizeError
from dist_kp.distributed import LaunchError, RanksDisagree
from dist_kp.distributed.agreement import version_fingerprint
from dist_kp.distributed.preemption import PreemptionHandler
from dist_kp.engine.checkpoint import CheckpointError, CheckpointStore
from dist_kp.engine.checkpointer import Checkpointer
from dist_kp.engine.hooks import (
    EARLY_STOP,
    BestWeightsHook,
    CheckpointHook,
    EarlyStopHook,
    EMAHook,
    EvaluationHook,
    FinalWeightsHook,
    Hook,
    PreemptionHook,
    has_state,
    user_hooks,
)
from dist_kp.engine.run_state import ResumeError, RunState, versions
from dist_kp.engine.schedule import apply_optim_config, batch_scaling, build_optimizer, build_scheduler
from dist_kp.engine.trainer import Trainer
from dist_kp.evaluation.backends import METRIC_NAMES
from dist_kp.evaluation.evaluator import Evaluator
from dist_kp.evaluation.results import EvaluationError
from dist_kp.model.execution import apply_execution_options
from dist_kp.model.ema import ModelEMA
from dist_kp.model.keypoint_rcnn import WeightsError, build_model, unwrap
from dist_kp.model.precision import grad_scaler
from dist_kp.storage.lease import RunFolderInUse, RunLease
from dist_kp.storage.run_folder import RunFolder
from dist_kp.tracking.tensorboard import start_tensorboard
from dist_kp.tracking.wandb_run import RunId, start_tracking

log = logging.getLogger("dist_kp.train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dist-kp train",
        description=__doc__,
        epilog="config sections:\n" + sections_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file (defaults: the reference recipe's values)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: section.key=value")
    return parser.parse_args(argv)


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def check_watched_metrics(cfg: Config) -> None:
    """checkpoint.keep_best and train.early_stop name a metric of the evaluation, which must run."""
    watched = {"checkpoint.keep_best": cfg.checkpoint.keep_best,
               "train.early_stop.metric": cfg.train.early_stop.metric if cfg.train.early_stop else None}
    for option, metric in watched.items():
        if metric is None:
            continue
        if metric not in METRIC_NAMES:
            raise ConfigError(f"{option}: {metric!r} is not an evaluation metric; choose one of "
                              f"{', '.join(METRIC_NAMES)}")
        if not cfg.eval.every_epochs:
            raise ConfigError(f"{option} watches {metric} at every evaluation, but eval.every_epochs=0 evaluates only "
                              "at the end: set eval.every_epochs to 1 or more")


def build_hooks(cfg: Config, folder: RunFolder, meta: dict, ema: ModelEMA | None) -> list[Hook]:
    """Hooks built before resuming (their state comes from the checkpoint): keep-best, early stop, the user's."""
    hooks: list[Hook] = []
    if cfg.checkpoint.keep_best:
        hooks.append(BestWeightsHook(folder, cfg.checkpoint.keep_best, cfg.checkpoint.keep_best_mode, cfg.model, meta,
                                     ema))
    if cfg.train.early_stop:
        hooks.append(EarlyStopHook(cfg.train.early_stop))
    return hooks + user_hooks(cfg)


def check_ranks_agree(cfg: Config, train: CachedKeypointIndex, val: CachedKeypointIndex | None) -> None:
    """Every rank has the same config, data and versions, or every rank stops here naming what differs."""
    distributed.check_ranks_agree({**config_fingerprint(cfg),
                                   **data_fingerprint(train, cfg.data.min_visible_keypoints, val),
                                   **version_fingerprint(versions())})


def take_lease(folder: RunFolder, info: distributed.DistInfo) -> RunLease | None:
    """Rank 0 takes the folder's lease (storage.lease); its refusal or storage error is raised on every rank."""
    lease, error = None, None
    if info.is_main:
        try:
            lease = RunLease.acquire(folder)
        except (RunFolderInUse, storage.StorageError) as caught:
            error = caught
    error = distributed.broadcast_object(error)  # every rank leaves with rank 0's message, none waits
    if error is not None:
        raise error
    return lease


@contextlib.contextmanager
def open_run_folder(cfg: Config, info: distributed.DistInfo, store: storage.Storage) -> Iterator[RunFolder]:
    """The run's folder on the one Storage of this run (passed to every reader and writer from here on).

    Held by this run's lease for the block: rank 0 takes it before writing anything there (another
    live run's is refused on every rank), then removes what killed writers left (the resolved config is
    written once the resume checks passed); it releases the lease when the block ends, however it ends.
    """
    folder = RunFolder(cfg.output_dir, store)
    lease = take_lease(folder, info)
    try:
        if info.is_main:
            folder.remove_stale_temporaries()
            log.info("world size %d, device %s, output_dir %s", info.world_size, info.device, folder.url)
            if "SLURM_JOB_ID" in os.environ:
                log.info("SLURM job %s, restart count %s", os.environ["SLURM_JOB_ID"],
                         os.environ.get("SLURM_RESTART_COUNT", "0"))
        yield folder
    finally:
        if lease is not None:
            lease.release()


def build_trainer(cfg: Config, index: KeypointIndex, flips: FlipPairs, info: distributed.DistInfo,
                  store: storage.Storage) -> Trainer:
    """The loader, the model (train.channels_last, train.compile; DDP when there are several processes), its
    optimizer, schedule and scaler."""
    loader, sampler = build_train_loader(cfg, index, info.rank, info.world_size, info.device, store, flips)
    model = build_model(cfg.model, index.meta.num_keypoints, store, index.meta.keypoint_names).to(info.device)
    apply_execution_options(model, cfg.train, info.device)
    if info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, sampler.batches_per_epoch)
    return Trainer(cfg.train, model, optimizer, scheduler, grad_scaler(cfg.train.precision, info.device),
                   DeviceBatches(loader, info.device, cfg.data.prefetch), sampler, info.device, cfg.optim.clip_grad_norm)


def run_state(cfg: Config, index: CachedKeypointIndex, trainer: Trainer, run_id: RunId,
              hooks: list[Hook]) -> RunState:
    """What every checkpoint holds: the trainer's parts, the W&B run id, the state of the hooks that have one,
    and the training data's fingerprint (a moved dataset resumes, a changed one is refused)."""
    # The resolved data.min_visible_keypoints is recorded and compared: null on COCO resumes a run that set 10.
    state = RunState(with_skeleton_defaults(cfg, index), data_fingerprint(index, cfg.data.min_visible_keypoints),
                     keypoints=index.meta.to_dict())
    for name, part in (("model", unwrap(trainer.model)), ("optimizer", trainer.optimizer),
                       ("scheduler", trainer.scheduler), ("scaler", trainer.scaler), ("progress", trainer.progress),
                       ("tracking", run_id)):
        state.register(name, part)
    for hook in hooks:
        if has_state(hook):
            state.register_hook(hook)
    return state


def run(cfg: Config) -> int:
    """Train to the end (exit status 0) or until a preemption signal (checkpoint, requeue, status)."""
    check_watched_metrics(cfg)
    preemption = PreemptionHandler(cfg.train.stop_grace_s)
    info = distributed.init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    store = storage.Storage.from_config(cfg.storage)
    index = train_index(cfg, store)
    evaluation_index = val_index(cfg, store) if cfg.eval.every_epochs or cfg.eval.at_end else None
    # Before anything is written or built: another batch size or model on one rank fails late, or hangs.
    check_ranks_agree(cfg, index, evaluation_index)
    # Once the ranks agree, so all refuse together; before the run folder is touched.
    flips = training_flip_pairs(cfg.data, index.meta.keypoint_names, index.source)
    if info.is_main:
        log.info("%s%s", flips.describe(), "" if cfg.data.hflip_prob else " (not used: data.hflip_prob=0)")
    with open_run_folder(cfg, info, store) as folder:
        try:
            return train_in(folder, cfg, info, preemption, index, evaluation_index, flips)
        finally:
            preemption.uninstall()


def train_in(folder: RunFolder, cfg: Config, info: distributed.DistInfo, preemption: PreemptionHandler,
             index: CachedKeypointIndex, evaluation_index: CachedKeypointIndex | None, flips: FlipPairs) -> int:
    """Build everything, resume, train; the exit status of `run`."""
    seed_everything(cfg.train.seed, info.rank)
    # Built now: a wrong eval.sigmas or backend fails at start, not after the first epoch.
    evaluator = Evaluator(cfg, evaluation_index, folder, info.device) if evaluation_index is not None else None
    trainer = build_trainer(cfg, index, flips, info, folder.storage)
    # The average of the weights (train.ema): what evaluation and the weights files use; restored on resume.
    ema = ModelEMA(trainer.model, cfg.train.ema) if cfg.train.ema else None
    averaging = [EMAHook(ema)] if ema is not None else []
    evaluation = [EvaluationHook(cfg.eval, evaluator, ema)] if evaluator is not None else []
    if info.is_main:
        log.info("%s", batch_scaling(cfg, info.world_size))
    # The weights files record the pairs trained with: an export's flip_permutation follows them.
    meta = dataclasses.replace(index.meta, flip_pairs=[list(pair) for pair in flips.pairs]).to_dict()
    own_hooks = build_hooks(cfg, folder, meta, ema)
    run_id = RunId()
    checkpointer = Checkpointer(run_state(cfg, index, trainer, run_id, [*averaging, *evaluation, *own_hooks]),
                                CheckpointStore(folder, cfg.checkpoint), cfg.checkpoint.resume)
    resumed = checkpointer.load()
    if resumed and trainer.past_end:
        # Training on would end at once and relabel later weights as the run's end: change nothing.
        if info.is_main:
            p = trainer.progress
            log.warning("%s is already past the end of this run (step %d, epoch %d, batch %d; now train.epochs=%d, "
                        "train.max_steps=%s): nothing to train, nothing written. Raise them to train on, or use "
                        "another output_dir for a shorter run.", resumed.url, p.step, p.epoch, p.batch,
                        cfg.train.epochs, cfg.train.max_steps)
        checkpointer.close()
        return 0
    if info.is_main:  # only now: a start refused at resume leaves the run's config.yaml as it was
        folder.write(folder.config, config_to_yaml(cfg).encode())
    if resumed:
        trainer.continue_from(resumed)
        apply_optim_config(trainer.optimizer, trainer.scheduler, cfg.optim)  # the config's values from now on
        if info.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resumed.url, resumed.step, resumed.epoch,
                     resumed.batch)
    tracker = start_tracking(cfg, folder, checkpointer, run_id, evaluation_index)
    if info.is_main:
        log.info("%d training images, %d steps per epoch per rank", len(trainer.loader.dataset),
                 trainer.steps_per_epoch)
    preempted = PreemptionHook(preemption)
    preemption.before_exit.append(checkpointer.finish_save)
    for hook in [*averaging,  # first: a step's checkpoint and evaluation see that step's average
                 CheckpointHook(checkpointer, cfg.checkpoint, on_saved=tracker.checkpoint_saved),
                 *evaluation,  # after the epoch end's checkpoint (which records the evaluation as pending)
                 FinalWeightsHook(folder, cfg.model, meta, ema), tracker, start_tensorboard(cfg, folder), preempted,
                 *own_hooks]:
        trainer.register(hook)
    trainer.train()
    # Every rank leaves together: none tears the process group down while rank 0 still writes.
    distributed.barrier()
    if info.is_main and trainer.stop_reason in (None, EARLY_STOP):
        log.info("training %s at step %d (epoch %d)", "finished" if trainer.stop_reason is None else "stopped early",
                 trainer.progress.step, trainer.progress.epoch)
    return preempted.exit_status


def main(argv: list[str] | None = None) -> int:
    distributed.setup_logging()
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        log.error("%s", error)
        return 2
    try:
        return run(cfg)
    except (ConfigError, LaunchError, RanksDisagree, BatchSizeError, DataError, RunFolderInUse) as error:
        log.error("rank %d: %s", distributed.get_rank(), error)
        return 2
    except (storage.StorageError, EvaluationError, CheckpointError, ResumeError, WeightsError) as error:
        log.error("rank %d: %s", distributed.get_rank(), error)
        return 1
    except Exception as error:
        timed_out = distributed.collective_timeout(error)
        if timed_out:
            log.error("%s", timed_out)
            return 1
        log.exception("training failed on rank %d", distributed.get_rank())
        raise
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(as_process(main))
