"""kp/AP of the EMA of the weights vs the trained weights at the end of the demo's training (issue 24).

    .venv/bin/python bench/bench_ema.py [--decay 0.98] [--warmup-steps 10] [--epochs 8] [--out /tmp/bench_ema]

Trains the demo (launch/demo.sh: 160 synthetic training images, 40 validation images, the tiny
CPU model, 2 processes under torchrun, 8 epochs = 160 steps) once with train.ema on; the EMA does
not change the training, so the run's last checkpoint holds the trained weights and its
model_final.pt their average. Both are evaluated by `python -m dist_kp.evaluate` on the
validation set; the table gives kp/AP, kp/AP50 and bbox/AP of each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("bench_ema")
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthetic_cpu.yaml"
METRICS = ("kp/AP", "kp/AP50", "bbox/AP")


def run(args: list[str]) -> None:
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args[:4])} exited {result.returncode}:\n{result.stderr[-4000:]}")


def evaluate(weights: Path, data: Path, out: Path) -> dict[str, float]:
    run(["-m", "dist_kp.evaluate", "--config", str(CONFIG), "--weights", str(weights), f"data.root={data}",
         f"output_dir={out}", "train.workers=0"])
    return json.loads((out / "eval" / f"{0:08d}" / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decay", type=float, default=0.98, help="train.ema.decay")
    parser.add_argument("--warmup-steps", type=int, default=10, help="train.ema.warmup_steps")
    parser.add_argument("--epochs", type=int, default=8, help="train.epochs (the demo's 8: 160 steps)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_ema"), help="scratch folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data, run_dir = args.out / "data", args.out / "run"
    if not (data / "annotations" / "person_keypoints_val2017.json").is_file():
        run(["-m", "dist_kp.data.synthetic", "--out", str(data), "--train", "160", "--val", "40", "--seed", "0"])
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dist_kp.train", "--config",
         str(CONFIG), f"data.root={data}", f"output_dir={run_dir}", f"train.epochs={args.epochs}",
         f"schedule.milestones=[{args.epochs - 2}]", "eval.every_epochs=0", "checkpoint.keep_last=1",
         f"train.ema.decay={args.decay}", f"train.ema.warmup_steps={args.warmup_steps}"])
    last = sorted((run_dir / "checkpoints").iterdir())[-1]
    raw = evaluate(last, data, args.out / "eval_raw")
    ema = evaluate(run_dir / "model_final.pt", data, args.out / "eval_ema")
    at_end = json.loads(sorted((run_dir / "eval").glob("*/metrics.json"))[-1].read_text())
    log.info("demo: %d epochs (%s), train.ema.decay=%s warmup_steps=%d", args.epochs, last.name, args.decay,
             args.warmup_steps)
    log.info("| weights | %s |", " | ".join(METRICS))
    log.info("|---|%s", "---|" * len(METRICS))
    for name, metrics in (("trained (last checkpoint)", raw), ("EMA (model_final.pt)", ema)):
        log.info("| %s | %s |", name, " | ".join(f"{metrics[k]:.4f}" for k in METRICS))
    log.info("training's own evaluation at the end (EMA, weights=%s) equals evaluate of model_final.pt: %s",
             at_end.get("weights"), all(at_end[k] == ema[k] for k in METRICS))


if __name__ == "__main__":
    main()
