#!/usr/bin/env bash
# Set up the environment if needed (Python packages; SLURM and munge from Debian for the cluster
# tests) and run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq slurm-wlm munge >/dev/null
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q "$@"
