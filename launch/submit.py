"""Submit dist_kp training through submitit (SLURM), or run it locally to try it out.

    python -m launch.submit --config configs/coco_kp_r50_fpn.yaml --nodes 2 --gpus-per-node 8 \\
        --partition gpu --time 2880 [section.key=value ...]
    python -m launch.submit --config configs/synthetic_cpu.yaml --local data.root=data/synthetic

Each task is one worker. On preemption or at the time limit SLURM signals the workers
(SIGUSR1, --signal-delay before the end): they checkpoint and requeue the job, which runs the
same training again and resumes from that checkpoint; submitit gets a result only from the run
that finishes. A signal that arrives while a worker is still starting reaches submitit's own
handler, whose checkpoint hook requeues the same training (it resumes from the newest checkpoint).
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

log = logging.getLogger("launch.submit")


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config of the training")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8, help="also the number of workers per node")
    parser.add_argument("--tasks-per-node", type=int, help="workers per node (default: --gpus-per-node, min 1)")
    parser.add_argument("--cpus-per-task", type=int, default=10)
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--time", type=int, default=2880, help="time limit in minutes")
    parser.add_argument("--signal-delay", type=int, default=120, help="seconds between SIGUSR1 and the kill")
    parser.add_argument("--job-name", default="dist_kp")
    parser.add_argument("--logs", default="submitit_logs", help="folder for submitit's logs and pickles")
    parser.add_argument("--local", action="store_true", help="run in a local process instead of SLURM")
    parser.add_argument("--wait", action="store_true", help="wait for the job and report its result")
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    return parser.parse_args(argv)


def build_executor(args: argparse.Namespace) -> submitit.Executor:
    folder = Path(args.logs) / "%j"
    if args.local:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=args.time)
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=20)
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
    executor = build_executor(args)
    try:
        job = executor.submit(TrainingJob(str(Path(args.config).resolve()), args.overrides))
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
    sys.exit(main())
