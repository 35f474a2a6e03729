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
# Tests run in TEST_WORKERS processes (pytest-xdist, default 2): most tests wait on processes they started
# (torchrun, SLURM, SeaweedFS) or train with one thread. A file's tests stay in one worker (its module
# fixtures are built once), the files that use SLURM all in one (tests/conftest.py: xdist_scope).
# `-n 0` runs everything in this process.
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" "$@"
