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
import logging
import os
import random
import sys

import numpy as np
import torch

from dist_kp import distributed, storage
from dist_kp.checkpoint import CheckpointError, CheckpointStore
from dist_kp.config import Config, ConfigError, config_to_yaml, load_config, sections_help
from dist_kp.data.index import DataError
from dist_kp.data.loaders import build_train_loader, train_index, val_index
from dist_kp.data.sampler import BatchSizeError
from dist_kp.distributed import LaunchError
from dist_kp.evaluation import EvaluationError, check_sigmas, evaluate_model
from dist_kp.hooks import CheckpointHook, EvaluationHook, FinalWeightsHook, PreemptionHook, user_hooks
from dist_kp.model import WeightsError, build_model, unwrap, weights_payload
from dist_kp.precision import grad_scaler
from dist_kp.preemption import PreemptionHandler
from dist_kp.run_folder import RunFolder
from dist_kp.run_state import ResumeError, RunState
from dist_kp.schedule import build_optimizer, build_scheduler
from dist_kp.tensorboard import start_tensorboard
from dist_kp.tracking import RunId, start_tracking
from dist_kp.trainer import Trainer

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


def run(cfg: Config) -> int:
    """Train to the end (exit status 0) or until a preemption signal (checkpoint, requeue, status)."""
    preemption = PreemptionHandler(cfg.train.stop_grace_s)
    info = distributed.init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    folder = RunFolder.for_config(cfg)
    seed_everything(cfg.train.seed, info.rank)
    if info.is_main:
        folder.remove_stale_temporaries()
        folder.write(folder.config, config_to_yaml(cfg).encode())
        log.info("world size %d, device %s, output_dir %s", info.world_size, info.device, folder.url)
        if "SLURM_JOB_ID" in os.environ:
            log.info("SLURM job %s, restart count %s", os.environ["SLURM_JOB_ID"],
                     os.environ.get("SLURM_RESTART_COUNT", "0"))

    index = train_index(cfg)
    evaluation_index = val_index(cfg) if cfg.eval.every_epochs or cfg.eval.at_end else None
    if evaluation_index is not None:  # a wrong eval.sigmas fails now, not after the first epoch
        check_sigmas(cfg.eval.sigmas, evaluation_index.meta.num_keypoints)
    loader, sampler = build_train_loader(cfg, index, info.rank, info.world_size, info.device)
    model = build_model(cfg.model, index.meta.num_keypoints, folder.storage).to(info.device)
    if info.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, sampler.batches_per_epoch)
    scaler = grad_scaler(cfg.train.precision, info.device)
    trainer = Trainer(cfg, model, optimizer, scheduler, scaler, loader, sampler, info.device)

    state = RunState(cfg)
    run_id = RunId()
    for name, part in (("model", unwrap(model)), ("optimizer", optimizer), ("scheduler", scheduler),
                       ("scaler", scaler), ("progress", trainer.progress), ("tracking", run_id)):
        state.register(name, part)
    store = CheckpointStore(folder, cfg.checkpoint)
    resumed = state.resume(store)
    if resumed:
        trainer.continue_from(resumed)
    tracker = start_tracking(cfg, folder, state, run_id)
    if info.is_main:
        if resumed:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resumed.url, resumed.step, resumed.epoch,
                     resumed.batch)
        log.info("%d training images, %d steps per epoch per rank", len(loader.dataset), trainer.steps_per_epoch)

    preempted = PreemptionHook(preemption)
    tensorboard = start_tensorboard(cfg, folder)
    hooks = [
        CheckpointHook(store, state, cfg.checkpoint, tracker.checkpoint_started, tracker.checkpoint_saved),
        EvaluationHook(cfg.eval, lambda step: evaluate_model(model, cfg, evaluation_index, info.device, step),
                       lambda step, output: (tracker.evaluation(step, output, evaluation_index),
                                             tensorboard.evaluation(step, output))),
        FinalWeightsHook(folder, lambda: weights_payload(model, cfg.model, index.meta.to_dict())),
        tracker,
        tensorboard,
        preempted,
        *user_hooks(cfg),
    ]
    for hook in hooks:
        trainer.register(hook)
    trainer.train()
    # Every rank leaves together: none tears the process group down while rank 0 still writes.
    distributed.barrier()
    if info.is_main and trainer.stop_reason is None:
        log.info("training finished at step %d (epoch %d)", trainer.progress.step, trainer.progress.epoch)
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
    except (ConfigError, LaunchError, BatchSizeError, DataError) as error:
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
    sys.exit(main())
