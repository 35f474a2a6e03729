"""`evaluate --results` as a whole process, before and after it stopped importing torch (issue 23).

    .venv/bin/python bench/bench_eval_file.py --before /path/to/old/checkout [--dets 40000 1000000]

For each size, generates val2017-like ground truth and results (20 detections per image, as
bench_eval.py does), then runs `python -m dist_kp.evaluate --annotations --results` from the
checkout given by --before and from this one, side by side on the same files: wall time and peak
RSS of each process (os.wait4), and whether the two wrote the same metrics.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_eval import make_data

log = logging.getLogger("bench_eval_file")
REPO = Path(__file__).resolve().parents[1]
DETS_PER_IMAGE = 20


def run_evaluate(checkout: Path, gt_path: Path, results_path: Path, out: Path) -> tuple[float, float, dict]:
    """Seconds, peak RSS (MB) and metrics of one `python -m dist_kp.evaluate` run from `checkout`."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "dist_kp.evaluate", "--annotations", str(gt_path),
                                "--results", str(results_path), "--out", str(out)], cwd=checkout,
                               env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"evaluate from {checkout} exited {process.returncode}")
    return seconds, usage.ru_maxrss / 1024, json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="checkout of the code before the change")
    parser.add_argument("--dets", type=int, nargs="+", default=[40_000], help="detections per results file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("| detections | file MB | before s | after s | after/before time | before peak MB | after peak MB "
             "| after/before memory | same metrics |")
    log.info("|---|---|---|---|---|---|---|---|---|")
    for dets in args.dets:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            gt_path, results_path = tmp / "gt.json", tmp / "results.json"
            gt, results = make_data(dets // DETS_PER_IMAGE, DETS_PER_IMAGE)
            gt_path.write_text(json.dumps(gt))
            results_path.write_text(json.dumps(results))
            del gt, results
            gc.collect()  # the measured processes, not this one, should have the memory
            before_s, before_mb, before = run_evaluate(args.before.resolve(), gt_path, results_path, tmp / "before")
            after_s, after_mb, after = run_evaluate(REPO, gt_path, results_path, tmp / "after")
            log.info("| %d | %.0f | %.1f | %.1f | %.2f | %.0f | %.0f | %.2f | %s |", dets,
                     results_path.stat().st_size / 2**20, before_s, after_s, after_s / before_s, before_mb,
                     after_mb, after_mb / before_mb, "yes" if before == after else "NO")


if __name__ == "__main__":
    main()
