"""submitit on GPUs: the environment a worker of an 8-GPU-per-node allocation sees, and the device it picks."""

from __future__ import annotations

import os

import pytest

from dist_kp.distributed import LaunchError, cuda_device_index, launcher_ranks
from dist_kp.submit import export_worker_environment

GPUS_PER_NODE = 8
ALL_GPUS = ",".join(map(str, range(GPUS_PER_NODE)))
EXPORTED = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
            "CUDA_VISIBLE_DEVICES")


def slurm_task_env(nodes: int, node: int, local_rank: int) -> dict[str, str]:
    """What SLURM gives one task of `sbatch --nodes=N --ntasks-per-node=8 --gpus-per-node=8`."""
    return {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_NODEID": str(node),
            "SLURM_JOB_NODELIST": f"gpu[01-{nodes:02d}]", "SLURM_NTASKS": str(nodes * GPUS_PER_NODE),
            "SLURM_PROCID": str(node * GPUS_PER_NODE + local_rank), "SLURM_LOCALID": str(local_rank),
            "CUDA_VISIBLE_DEVICES": ALL_GPUS}


@pytest.fixture
def task_env(monkeypatch: pytest.MonkeyPatch):
    """Replace the process's launcher variables with a SLURM task's; all restored after the test."""
    def set_env(env: dict[str, str]) -> None:
        for name in {*EXPORTED, *env, "SLURM_STEP_ID"}:
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
    return set_env


@pytest.mark.parametrize("nodes, node, local_rank", [(1, 0, 0), (1, 0, 1), (1, 0, 7), (2, 1, 0), (2, 1, 5)])
def test_every_submitit_worker_of_an_8_gpu_node_sees_all_gpus_and_picks_its_local_rank(
        task_env, nodes: int, node: int, local_rank: int) -> None:
    task_env(slurm_task_env(nodes, node, local_rank))
    export_worker_environment()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ALL_GPUS
    assert os.environ["MASTER_ADDR"] == "gpu01"
    rank, world_size, seen_local_rank = launcher_ranks()
    assert (rank, world_size, seen_local_rank) == (node * GPUS_PER_NODE + local_rank, nodes * GPUS_PER_NODE,
                                                   local_rank)
    visible = len(os.environ["CUDA_VISIBLE_DEVICES"].split(","))
    assert cuda_device_index(seen_local_rank, visible) == local_rank


def test_a_worker_given_one_gpu_uses_device_0_whatever_its_local_rank() -> None:
    # srun --gpus-per-task=1, or submitit's own export: CUDA_VISIBLE_DEVICES=<local rank>.
    assert [cuda_device_index(local_rank, 1) for local_rank in range(GPUS_PER_NODE)] == [0] * GPUS_PER_NODE


def test_more_workers_than_visible_gpus_is_refused_naming_the_local_rank() -> None:
    with pytest.raises(LaunchError, match="LOCAL_RANK=4 but this process sees 4 CUDA devices"):
        cuda_device_index(4, 4)


def test_a_task_started_by_torchrun_keeps_torchruns_variables(task_env) -> None:
    task_env({**slurm_task_env(1, 0, 3), "RANK": "5", "LOCAL_RANK": "1"})
    export_worker_environment()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["CUDA_VISIBLE_DEVICES"]) == ("5", "1", ALL_GPUS)
