"""Submit dist_kp training through submitit (SLURM), or run it locally to try it out.

    dist-kp submit --config configs/coco_kp_r50_fpn.yaml --nodes 2 --gpus-per-node 8 \\
        --partition gpu --time 2880 [section.key=value ...]
    dist-kp submit --config configs/synthetic_cpu.yaml --local data.root=data/synthetic

(`python -m dist_kp.submit` is the same command.) Each task is one worker. On preemption or at
the time limit SLURM signals the workers (SIGUSR1, --signal-delay before the end): they checkpoint
and requeue the job, which runs the same training again and resumes from that checkpoint;
submitit gets a result only from the run that finishes. A signal that arrives while a worker is
still starting reaches submitit's own handler, whose checkpoint hook requeues the same training
(it resumes from the newest checkpoint).

submitit's logs and pickles go to OUTPUT_DIR/submitit/ (on SLURM one folder per job id), or to
--logs; nothing is written to the current folder. The config and overrides are checked before
anything is submitted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# submitit's preemption signal, read when it is imported: SLURM's usual USR1, which dist_kp's
# workers handle themselves (checkpoint at the next step, then requeue).
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")

import submitit  # noqa: E402

from dist_kp.cli import as_process  # noqa: E402
from dist_kp.config import Config, ConfigError, load_config  # noqa: E402
from dist_kp.config.packaged import resolve_config  # noqa: E402
from dist_kp.storage import is_local_url, local_path  # noqa: E402
from dist_kp.storage.run_folder import RunFolder  # noqa: E402

log = logging.getLogger("dist_kp.submit")


def export_worker_environment() -> None:
    """In a SLURM task not started by torchrun: export torch's env:// variables, every GPU of the node left visible.

    submitit's export narrows CUDA_VISIBLE_DEVICES to the local rank by default, which would
    make cuda:LOCAL_RANK invalid above rank 0; dist_kp picks the worker's device itself
    (distributed.cuda_device_index).
    """
    if "SLURM_JOB_ID" in os.environ and "RANK" not in os.environ:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


class TrainingJob(submitit.helpers.Checkpointable):
    """One worker of the training; submitit pickles it and runs it in every task."""

    def __init__(self, config: str, overrides: list[str]) -> None:
        self.config = config
        self.overrides = overrides

    def __call__(self) -> int:
        from dist_kp import train
        from dist_kp.distributed import preemption

        export_worker_environment()
        status = train.main(["--config", self.config, *self.overrides])
        if preemption.job_requeued():
            # The requeued job runs this again and resumes; a result now would tell submitit it is over.
            sys.exit(0)
        if status:
            raise RuntimeError(f"training exited with status {status}")
        return status

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        # The training resumes from its newest checkpoint by itself (checkpoint.resume=auto).
        return submitit.helpers.DelayedSubmission(TrainingJob(self.config, self.overrides))


def add_slurm_arguments(parser: argparse.ArgumentParser, job_name: str = "dist_kp") -> None:
    """The SLURM request of one training (`dist-kp submit`, and each trial of `dist-kp sweep`)."""
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default: %(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="GPUs per node, also the number of workers per node (default: %(default)s)")
    parser.add_argument("--tasks-per-node", type=int,
                        help="workers per node (default: --gpus-per-node, at least 1)")
    parser.add_argument("--cpus-per-task", type=int, default=4,
                        help="CPUs per worker: its data-loader workers (train.workers) and 2 for itself; "
                        "README 'Sizing CPUs per GPU' (default: %(default)s)")
    parser.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    parser.add_argument("--account", help="SLURM account (default: yours)")
    parser.add_argument("--time", type=int, default=2880, help="time limit in minutes (default: %(default)s)")
    parser.add_argument("--signal-delay", type=int, default=120,
                        help="seconds between SIGUSR1 and the kill (default: %(default)s)")
    parser.add_argument("--job-name", default=job_name, help="SLURM job name (default: %(default)s)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dist-kp submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config of the training, or a packaged config's name")
    add_slurm_arguments(parser)
    parser.add_argument("--logs", help="folder for submitit's logs and pickles, seen by this host and every node "
                        "(default: OUTPUT_DIR/submitit; required when output_dir is an object-store URL)")
    parser.add_argument("--local", action="store_true", help="run in a local process instead of SLURM")
    parser.add_argument("--wait", action="store_true", help="wait for the job and report its result")
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    return parser.parse_args(argv)


def logs_folder(args: argparse.Namespace, cfg: Config) -> Path:
    """Where submitit writes: --logs, else OUTPUT_DIR/submitit (a local output_dir; an object store cannot hold them)."""
    if args.logs:
        return Path(args.logs).resolve()
    if not is_local_url(cfg.output_dir):
        raise ConfigError(f"output_dir={cfg.output_dir} is not a local folder, and submitit's logs need one: "
                          "give --logs a folder that this host and every node see")
    return Path(local_path(RunFolder(cfg.output_dir).submitit)).resolve()


def build_executor(args: argparse.Namespace, logs: Path) -> submitit.Executor:
    if args.local:
        # No %j here: the local controller would create a folder named `%j` literally; file names carry the id.
        executor = submitit.LocalExecutor(folder=logs)
        executor.update_parameters(timeout_min=args.time)
        return executor
    executor = submitit.SlurmExecutor(folder=logs / "%j", max_num_timeout=20)
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    parameters = dict(job_name=args.job_name, nodes=args.nodes, ntasks_per_node=tasks,
                      cpus_per_task=args.cpus_per_task, time=args.time, signal_delay_s=args.signal_delay,
                      additional_parameters={"requeue": True})
    if args.gpus_per_node:
        parameters["gpus_per_node"] = args.gpus_per_node
    if args.partition:
        parameters["partition"] = args.partition
    if args.account:
        parameters["account"] = args.account
    executor.update_parameters(**parameters)
    return executor


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        logs = logs_folder(args, cfg)
    except ConfigError as error:
        log.error("%s", error)
        return 2
    executor = build_executor(args, logs)
    try:
        job = executor.submit(TrainingJob(str(Path(resolve_config(args.config)).resolve()), args.overrides))
    except Exception as error:  # noqa: BLE001 - sbatch's refusal comes as a generic submitit error
        log.error("submission refused: %s", str(error).strip().splitlines()[-1] if str(error).strip() else error)
        return 2
    log.info("submitted job %s", job.job_id)
    log.info("logs: %s and %s", job.paths.stdout, job.paths.stderr)
    if args.wait:
        try:
            job.results()
        except Exception as error:  # noqa: BLE001 - submitit wraps the remote failure
            log.error("job %s failed: %s", job.job_id, error)
            return 1
        log.info("job %s completed", job.job_id)
    return 0


if __name__ == "__main__":
    sys.exit(as_process(main))
