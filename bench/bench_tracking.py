"""What tracking costs rank 0: W&B start, one training record, one evaluation's pictures (issue 6).

    .venv/bin/python bench/bench_tracking.py [--records 200] [--data data/synthetic]

In one process, W&B offline (WANDB_DIR in a temp folder; WANDB_BASE_URL at a closed loopback
port, so nothing leaves the machine): the time of wandb.init (Tracker start), the mean time of
`Tracker.record` (metrics.jsonl append + wandb.log of a full training record) with W&B offline
and disabled, and of `Tracker.evaluation` (4 validation images drawn, PNG written, W&B images)
— the extra time the training loop waits at each of those points.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_kp.config import load_config  # noqa: E402
from dist_kp.data.index import load_index  # noqa: E402
from dist_kp.evaluation.backends import metrics_dict
from dist_kp.evaluation.evaluator import EvalOutput  # noqa: E402
from dist_kp.storage import Storage  # noqa: E402
from dist_kp.storage.run_folder import RunFolder  # noqa: E402
from dist_kp.tracking.metrics_file import MetricsFile  # noqa: E402
from dist_kp.tracking.wandb_run import Tracker  # noqa: E402

log = logging.getLogger("bench_tracking")
REPO = Path(__file__).resolve().parents[1]
TERMS = ("loss", "loss_classifier", "loss_box_reg", "loss_keypoint", "loss_objectness", "loss_rpn_box_reg")


def record(step: int) -> dict:
    values = {f"train/{t}": 1.0 / step for t in TERMS}
    return {"epoch": 0, "batch": step, "step": step, "lr": 0.02, **values,
            **{f"{k}_smoothed": v for k, v in values.items()}, "images_per_s": 40.0, "data_time_s": 0.01,
            "max_memory_mb": 0.0}


def measure(mode: str, data: str, records: int, folder: Path) -> dict[str, float]:
    out = folder / mode
    out.mkdir()
    cfg = load_config(REPO / "configs" / "synthetic_cpu.yaml",
                      [f"data.root={data}", f"output_dir={out}", f"tracking.mode={mode}", "eval.num_visualize=4"])
    index = load_index(f"{data}/annotations/person_keypoints_val2017.json", Storage())
    started = time.perf_counter()
    tracker = Tracker(cfg, MetricsFile(RunFolder(str(out))), run_id=f"bench-{mode}", index=index)
    start_s = time.perf_counter() - started
    times = []
    for step in range(1, records + 1):
        started = time.perf_counter()
        tracker.record(record(step))
        times.append(time.perf_counter() - started)
    results = [{"image_id": int(index.image_ids[i]), "category_id": 1, "bbox": [10.0, 10.0, 40.0, 80.0],
                "keypoints": sum(([20.0 + k, 20.0 + 3 * k, 1.0] for k in range(17)), []), "score": 0.9}
               for i in range(4)]
    output = EvalOutput(metrics_dict({"keypoints": [0.1] * 10, "bbox": [0.2] * 12}), results, "")
    started = time.perf_counter()
    # What the trainer hands its hooks after an evaluation: the metrics, the output on trainer.evaluation.
    trainer = SimpleNamespace(progress=SimpleNamespace(step=records + 1), evaluation=output)
    tracker.after_evaluation(trainer, output.metrics)
    eval_s = time.perf_counter() - started
    started = time.perf_counter()
    tracker.finish()
    finish_s = time.perf_counter() - started
    return {"start_s": start_s, "record_ms_mean": 1000 * statistics.mean(times),
            "record_ms_p95": 1000 * sorted(times)[int(0.95 * len(times))], "evaluation_s": eval_s,
            "finish_s": finish_s}


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--data", default=str(REPO / "data" / "synthetic"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(WANDB_DIR=tmp, WANDB_SILENT="true", WANDB_BASE_URL="http://127.0.0.1:9")
        os.environ.pop("WANDB_MODE", None)
        for mode in ("disabled", "offline"):
            numbers = measure(mode, args.data, args.records, Path(tmp))
            log.info("%-9s %s", mode, "  ".join(f"{k} {v:.3f}" for k, v in numbers.items()))


if __name__ == "__main__":
    main()
