"""Shared fixtures: a generated dataset and a way to run the real CLIs (torchrun included)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "synthetic_cpu.yaml"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated COCO person-keypoints dataset (shared by the whole session)."""
    from dist_kp.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic"), train=48, val=16, seed=0)


def tiny_overrides(data_root: Path, output_dir: str | Path, *extra: str) -> list[str]:
    """Overrides that make the tiny config run in seconds on the test dataset."""
    return [f"data.root={data_root}", f"output_dir={output_dir}", "train.log_every=1", *extra]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled", **extra)
    return env


def run_module(module: str, args: list[str], nproc: int = 1, timeout: float = 600, env: dict | None = None,
               torchrun_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `python -m module args` alone (nproc=1) or under torchrun with nproc processes."""
    if nproc == 1 and not torchrun_args:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *torchrun_args, "-m", module, *args]
    return subprocess.run(cmd, cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-8000:]}"
    return result
