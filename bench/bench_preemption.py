"""Preemption on a real one-node SLURM cluster: signal -> checkpoint -> requeue -> training again (issue 5).

    .venv/bin/python bench/bench_preemption.py [--repeats 2] [--signals USR1 TERM] [--every-steps 500]

Starts the test cluster (tests/slurm_cluster.py: Debian slurm-wlm + munge, root), submits the
user's command `sbatch slurm/train_8gpu.sh configs/synthetic_cpu.yaml ...` with 2 tasks of 1 CPU,
sends the signal the way SLURM does (`scancel --signal=SIG JOB`, to the job's steps) once step 5
is logged, and times from the signal:

- saved:     the checkpoint of the stop step is stored (rank 0's log);
- requeued:  `scontrol requeue` returned (rank 0's log);
- allocated: slurmctld started the requeued job again (its log);
- started:   the requeued workers joined the process group (`restart count 1` logged);
- resumed:   the checkpoint is loaded;
- training:  the first step after the resume is logged.

Steps lost = the last step the first run logged minus the step the second run resumed from.
`--every-steps` is checkpoint.every_steps (500 is the config default): with a signal the stop
step is saved whatever the interval. The cluster uses cred_expire=5 and 1 s scheduler intervals
(SLURM's defaults make the requeued job wait ~2 min instead of ~6 s).
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_kp.data.synthetic import generate  # noqa: E402
from tests.slurm_cluster import SlurmCluster, start_cluster  # noqa: E402

log = logging.getLogger("bench_preemption")
REPO = Path(__file__).resolve().parents[1]
PHASES = ("saved", "requeued", "allocated", "started", "resumed", "training")


def stamp(line: str) -> float:
    """Epoch seconds of a dist_kp log line (`2026-11-24 17:16:57,124 [rank0] ...`)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def ctld_stamp(line: str) -> float:
    """Epoch seconds of a slurmctld log line (`[2026-11-24T17:17:08.071] ...`)."""
    return datetime.strptime(line[1:24], "%Y-%m-%dT%H:%M:%S.%f").timestamp()


def first(lines: list[str], pattern: str, after: float) -> tuple[float, str] | None:
    for line in lines:
        if re.search(pattern, line) and line[:4].isdigit() and stamp(line) >= after:
            return stamp(line), line
    return None


def one_preemption(cluster: SlurmCluster, data: Path, work: Path, sig: str, every_steps: int) -> dict[str, float]:
    out = work / "run"
    job_id = cluster.run(
        "sbatch", "--parsable", f"--chdir={work}", f"--export=ALL,PYTHON={sys.executable},OMP_NUM_THREADS=1",
        "--ntasks-per-node=2", "--cpus-per-task=1", str(REPO / "slurm" / "train_8gpu.sh"),
        str(REPO / "configs" / "synthetic_cpu.yaml"), f"data.root={data}", f"output_dir={out}", "train.max_steps=12",
        f"checkpoint.every_steps={every_steps}", "eval.every_epochs=0", "eval.at_end=false", "train.workers=0",
        "train.log_every=1").stdout.strip().split(";")[0]
    job_log = work / f"dist_kp-{job_id}.log"
    while not re.search(r"\] step 5 ", job_log.read_text() if job_log.exists() else ""):
        time.sleep(0.1)
    signalled = time.time()
    cluster.run("scancel", f"--signal={sig}", job_id)
    cluster.wait_job(job_id, timeout=600)
    lines = job_log.read_text().splitlines()
    ctld = (cluster.root / "slurmctld.log").read_text().splitlines()
    # The scheduler logs "Allocate JobId=N", the backfill scheduler "Started JobId=N": either starts the job.
    allocated = [ctld_stamp(line) for line in ctld if re.search(rf"(Allocate|Started) JobId={job_id} ", line)]
    saved = first(lines, r"checkpoint step \d+ saved", signalled)
    requeued = first(lines, r"stopped by SIG\w+: checkpoint saved, SLURM job \d+ requeued", signalled)
    started = first(lines, r"restart count 1", signalled)
    resumed = first(lines, r"resumed from .* at step \d+", signalled)
    if not (saved and requeued and started and resumed and len(allocated) >= 2):
        raise RuntimeError(f"job {job_id} did not go through save, requeue and resume:\n" + "\n".join(lines[-40:]))
    resumed_step = int(re.search(r"at step (\d+)", resumed[1]).group(1))
    training = first(lines, rf"\] step {resumed_step + 1} ", resumed[0])
    before_stop = [int(m.group(1)) for line in lines if line[:4].isdigit() and stamp(line) <= requeued[0]
                   for m in [re.search(r"\] step (\d+) ", line)] if m]
    result = {"saved": saved[0], "requeued": requeued[0], "allocated": allocated[1], "started": started[0],
              "resumed": resumed[0], "training": training[0]}
    result = {k: v - signalled for k, v in result.items()}
    result["steps_lost"] = max(before_stop) - resumed_step
    result["signal_at_step"] = max(int(m.group(1)) for line in lines if line[:4].isdigit() and stamp(line) <= signalled
                                   for m in [re.search(r"\] step (\d+) ", line)] if m)
    result["resumed_step"] = resumed_step
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--signals", nargs="+", default=["USR1", "TERM"])
    parser.add_argument("--every-steps", type=int, default=500, help="checkpoint.every_steps (default: the default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="bench_preemption_") as tmp:
        folder = Path(tmp)
        data = generate(folder / "data", train=48, val=16, seed=0)
        cluster = start_cluster(folder / "slurm")
        try:
            rows = {sig: [one_preemption(cluster, data, _mkdir(folder / f"{sig}{i}"), sig, args.every_steps)
                          for i in range(args.repeats)] for sig in args.signals}
        finally:
            cluster.stop()
    log.info("seconds from `scancel --signal=SIG` (median of %d; every_steps=%d)", args.repeats, args.every_steps)
    log.info("%-6s %s  steps lost (signal at step -> resumed from)", "signal", " ".join(f"{p:>9}" for p in PHASES))
    for sig, results in rows.items():
        cells = " ".join(f"{statistics.median(r[p] for r in results):9.1f}" for p in PHASES)
        lost = ", ".join(f"{r['steps_lost']} ({r['signal_at_step']} -> {r['resumed_step']})" for r in results)
        log.info("%-6s %s  %s", sig, cells, lost)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


if __name__ == "__main__":
    main()
