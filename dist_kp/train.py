"""Train Keypoint R-CNN, alone or as one worker of torchrun / srun.

usage:
  python -m dist_kp.train --config CONFIG.yaml [section.key=value ...]
  torchrun --nproc_per_node=4 -m dist_kp.train --config CONFIG.yaml [section.key=value ...]

Overrides are dotted keys with YAML values, e.g. optim.lr=0.01 train.epochs=2
output_dir=s3://bucket/runs/exp1. The resolved config is written to OUTPUT_DIR/config.yaml.
Running the same command again resumes from the newest valid checkpoint in OUTPUT_DIR
(checkpoint.resume=auto), mid-epoch, with the same data order and random state.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import random
import sys

import numpy as np
import torch

from dist_kp import distributed, storage
from dist_kp.checkpoint import Checkpointer, CheckpointStore, TrainState, resume_training
from dist_kp.config import Config, ConfigError, config_to_yaml, load_config, sections_help
from dist_kp.data.loaders import build_train_loader, train_index, val_index
from dist_kp.engine import (
    TrainProgress,
    build_optimizer,
    build_scheduler,
    check_replicas_identical,
    train_one_epoch,
)
from dist_kp.evaluation import EvaluationError, check_sigmas, evaluate_model
from dist_kp.metrics import MetricsFile
from dist_kp.model import build_model, weights_payload
from dist_kp.tracking import start_tracking
from dist_kp.preemption import PreemptionHandler

log = logging.getLogger("dist_kp.train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dist_kp.train",
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


def write_config(cfg: Config) -> None:
    storage.write_url(f"{cfg.output_dir.rstrip('/')}/config.yaml", config_to_yaml(cfg).encode())


def save_final_weights(model: torch.nn.Module, cfg: Config, keypoint_meta: dict) -> None:
    """OUTPUT_DIR/model_final.pt: the state dict plus what inference needs to rebuild the model."""
    url = f"{cfg.output_dir.rstrip('/')}/model_final.pt"
    buffer = io.BytesIO()
    torch.save(weights_payload(model, cfg.model, keypoint_meta), buffer)
    storage.write_url(url, buffer.getvalue())
    log.info("final weights written to %s", url)


def finished(progress: TrainProgress, cfg: Config) -> bool:
    return progress.epoch >= cfg.train.epochs or (
        cfg.train.max_steps is not None and progress.step >= cfg.train.max_steps)


def run(cfg: Config) -> int:
    """Train to the end (exit status 0) or until a preemption signal (checkpoint, requeue, status)."""
    preemption = PreemptionHandler()
    info = distributed.init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    storage.configure(cfg.checkpoint.storage_options, cfg.checkpoint.timeout_s)
    seed_everything(cfg.train.seed, info.rank)
    store = CheckpointStore(cfg.output_dir, cfg.checkpoint)
    if info.is_main:
        write_config(cfg)
        log.info("world size %d, device %s, output_dir %s", info.world_size, info.device, cfg.output_dir)
        if "SLURM_JOB_ID" in os.environ:
            log.info("SLURM job %s, restart count %s", os.environ["SLURM_JOB_ID"],
                     os.environ.get("SLURM_RESTART_COUNT", "0"))

    index = train_index(cfg)
    evaluation_index = val_index(cfg) if cfg.eval.every_epochs or cfg.eval.at_end else None
    if evaluation_index is not None:  # a wrong eval.sigmas fails now, not after the first epoch
        check_sigmas(cfg.eval.sigmas, evaluation_index.meta.num_keypoints)
    loader, sampler = build_train_loader(cfg, index, info.rank, info.world_size, info.device)
    model = build_model(cfg.model, index.meta.num_keypoints).to(info.device)
    if info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
        )
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, sampler.batches_per_epoch)
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.train.amp and info.device.type == "cuda")
    progress = TrainProgress()
    train_state = TrainState(model, optimizer, scheduler, scaler, progress, cfg)
    resumed = resume_training(store, train_state)
    checkpointer = Checkpointer(store, train_state, sampler.batches_per_epoch)
    metrics = MetricsFile(f"{cfg.output_dir.rstrip('/')}/metrics.jsonl") if info.is_main else None
    tracker = start_tracking(cfg, train_state, metrics)
    store.on_started, store.on_saved = tracker.checkpoint_started, tracker.checkpoint_saved
    if info.is_main:
        if resumed:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resumed, progress.step, progress.epoch,
                     progress.batch)
        # Records past the checkpoint, or of a start killed before its first checkpoint, are redone.
        metrics.truncate_after(progress.step)
        log.info("%d training images, %d steps per epoch per rank", len(loader.dataset), sampler.batches_per_epoch)

    preempted = False

    def after_step(progress: TrainProgress) -> bool:
        nonlocal preempted
        checkpointer.after_step(progress)
        preempted = preemption.should_stop()
        if preempted:
            checkpointer.save(wait=True)
        return preempted

    evaluated_at = -1
    while not finished(progress, cfg):
        sampler.set_epoch(progress.epoch, start_batch=progress.batch)
        stopped = train_one_epoch(
            model, optimizer, scheduler, loader, progress, cfg, info.device, scaler,
            record=tracker.record,
            after_step=after_step,
        )
        if preempted:
            break
        if progress.batch == sampler.batches_per_epoch:
            progress.epoch += 1
            progress.batch = 0
            checkpointer.save(epoch_end=True)
            if cfg.eval.every_epochs and progress.epoch % cfg.eval.every_epochs == 0:
                tracker.evaluation(progress.step, evaluate_model(model, cfg, evaluation_index, info.device,
                                                                 progress.step), evaluation_index)
                evaluated_at = progress.step
        if stopped:
            break
    checkpointer.save(wait=True)
    checkpointer.close()
    if preempted:
        tracker.finish(preempted=True)
        return preemption.finish()
    if cfg.eval.at_end and evaluated_at != progress.step:
        tracker.evaluation(progress.step, evaluate_model(model, cfg, evaluation_index, info.device, progress.step),
                           evaluation_index)
    check_replicas_identical(model)
    if info.is_main:
        save_final_weights(model, cfg, index.meta.to_dict())
        log.info("training finished at step %d (epoch %d)", progress.step, progress.epoch)
    tracker.finish()
    return 0


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
    except (storage.StorageError, EvaluationError) as error:
        log.error("rank %d: %s", distributed.get_rank(), error)
        return 1
    except Exception:
        log.exception("training failed on rank %d", distributed.get_rank())
        raise
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
