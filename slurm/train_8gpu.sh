#!/bin/bash
# dist_kp training on SLURM: one task (worker process) per GPU, started by srun.
#
#   sbatch slurm/train_8gpu.sh configs/coco_kp_r50_fpn.yaml data.root=/datasets/coco
#   sbatch --nodes=4 slurm/train_8gpu.sh configs/coco_kp_r50_fpn.yaml optim.lr=0.08 schedule.warmup_iters=250
#   CONFIG=configs/coco_kp_r50_fpn.yaml OVERRIDES="train.epochs=2" sbatch slurm/train_8gpu.sh
#
# Preemption: SLURM sends SIGUSR1 to every worker 120 s before the time limit (or on
# preemption); the workers checkpoint at the next step and rank 0 requeues the job, which then
# resumes from that checkpoint. Resubmitting the same command also resumes (checkpoint.resume=auto).
#
# For your site, add or change:
#   #SBATCH --partition=...        (the GPU partition)
#   #SBATCH --account=...          (the project to charge)
#   #SBATCH --constraint=...       (e.g. a GPU model: a100|h100)
#   container: add --container-image=... --container-mounts=... --container-env=OMP_NUM_THREADS,NCCL_DEBUG
#              to the srun line (pyxis/enroot; --container-env lets this script's values win over the image's),
#              or prefix the python command with `apptainer exec --nv dist_kp.sif` (see docker/README.md)
#   PYTHON:    the interpreter of the environment with dist_kp installed (default: python3 on PATH)
# CPUs: 4 per GPU task: the COCO config's 2 data-loader workers (train.workers) and 2 for the training
# process. bench/bench_loader.py measured one worker at about 220 COCO-size img/s per core (README,
# "Sizing CPUs per GPU"): 2 workers are 11x the 40 img/s per GPU dist_kp aims at. Images on object
# storage need more workers (they wait on requests), not more cores.
#SBATCH --job-name=dist_kp
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=4
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log

set -euo pipefail

CONFIG=${1:-${CONFIG:-configs/coco_kp_r50_fpn.yaml}}
[ $# -gt 0 ] && shift
# Overrides: the script's arguments after the config, then $OVERRIDES (space separated).
read -r -a ENV_OVERRIDES <<< "${OVERRIDES:-}"
PYTHON=${PYTHON:-python3}

# Rendezvous: the first host of the allocation, a port derived from the job id.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The port formula of dist_kp.distributed.master_port (tests/test_launch_env.py checks they agree).
MASTER_PORT=$((15000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT
# A few OpenMP threads per worker; the data-loader workers (train.workers) use the other CPUs of the task.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# NCCL: report errors instead of hanging; pick the network with NCCL_SOCKET_IFNAME / NCCL_IB_HCA here.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: ${SLURM_NTASKS} workers," \
     "master ${MASTER_ADDR}:${MASTER_PORT}, config ${CONFIG}"

# A signal for this shell only (--signal=B:USR1@..., scancel --batch) would end it, and with it the
# job, while the workers save: pass it on to the workers as SIGUSR1 (srun forwards SIGUSR1 to every
# task; a SIGTERM it gets itself it answers by killing them) and keep waiting for them.
srun_pid=""
pass_on() {
    echo "batch shell: SIG$1, passed on to the workers as SIGUSR1"
    [ -z "$srun_pid" ] || kill -s USR1 "$srun_pid" 2>/dev/null || true
}
trap 'pass_on USR1' USR1
trap 'pass_on TERM' TERM

# srun (not torchrun) starts the workers, so SLURM's SIGUSR1 reaches every one of them.
# --kill-on-bad-exit: a worker that fails ends the step at once instead of leaving the others hanging.
srun --kill-on-bad-exit=1 --cpu-bind=none \
    "$PYTHON" -m dist_kp.train --config "$CONFIG" "$@" "${ENV_OVERRIDES[@]}" &
srun_pid=$!
# A trap runs only while the shell waits, and ends that wait: wait again until srun is gone.
while true; do
    status=0
    wait "$srun_pid" || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done
exit "$status"
