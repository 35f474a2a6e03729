"""Seconds per training step of the tiny CPU config at 1 and 2 processes (issue 2's note).

    .venv/bin/python bench/bench_train_step.py [--steps 40]

Runs the real CLI (alone, then under torchrun) on a generated dataset and reads the
steady-state step time from metrics.jsonl (window mean over the last logged steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dist_kp.data.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_train_step")


def step_seconds(nproc: int, root: Path, out: Path, steps: int) -> tuple[float, float]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, "-m", "dist_kp.train", "--config", str(REPO / "configs/synthetic_cpu.yaml"),
           f"data.root={root}", f"output_dir={out}", f"train.max_steps={steps}", "train.log_every=1",
           "eval.every_epochs=0", "eval.at_end=false", "train.workers=1"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    subprocess.run(cmd, check=True, env=env, capture_output=True, cwd=REPO)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    images_per_step = 4 * nproc
    return images_per_step / last["images_per_s"], last["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "data", train=96, val=4, seed=0)
        log.info("| processes | s/step (batch 4 per process) | images/s |")
        log.info("|---|---|---|")
        for nproc in (1, 2):
            seconds, ips = step_seconds(nproc, root, Path(tmp) / f"run{nproc}", args.steps)
            log.info("| %d | %.3f | %.1f |", nproc, seconds, ips)


if __name__ == "__main__":
    main()
