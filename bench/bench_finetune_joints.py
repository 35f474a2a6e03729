"""kp/AP of a 5-joint fine-tune from a 17-keypoint model: rows copied by joint name vs a re-initialised head
(issue 24 item 2's note).

    .venv/bin/python bench/bench_finetune_joints.py [--source-steps 300] [--steps 100] [--train 200] [--val 40]

1. Generates the synthetic set twice from one seed, the same images: all 17 COCO keypoints, and the
   5-joint subset nose, shoulders, hips (`dist-kp synthetic --keypoints ...`).
2. Trains the tiny CPU config --source-steps steps on the 17-keypoint set: its model_final.pt names its joints.
3. Starts the 5-joint model from it two ways: from model_final.pt (keypoint predictor rows copied by joint
   name) and from the same tensors as a bare state dict (no names: the keypoint predictor re-initialised,
   as before joint names). Each start is evaluated before any step (the model build_model gives train,
   in this process), then fine-tuned --steps steps with the same seed (the real CLI), evaluated every epoch.
Prints a markdown table of kp/AP and bbox/AP per step, and the seconds each run took. With --work, a
second start reuses what the folder holds: the data, the source model once trained, and each run
resumes from its checkpoints (a stopped run continues; SIGTERM saves one).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_kp import distributed  # noqa: E402
from dist_kp.config import load_config  # noqa: E402
from dist_kp.data.loaders import val_index  # noqa: E402
from dist_kp.data.synthetic import generate  # noqa: E402
from dist_kp.evaluation.evaluator import Evaluator  # noqa: E402
from dist_kp.model.keypoint_rcnn import build_model  # noqa: E402
from dist_kp.storage import Storage  # noqa: E402
from dist_kp.storage.run_folder import RunFolder  # noqa: E402

log = logging.getLogger("bench_finetune_joints")
CONFIG = REPO / "configs" / "synthetic_cpu.yaml"
FIVE = ["nose", "left_shoulder", "right_shoulder", "left_hip", "right_hip"]
FIVE_SIGMAS = "eval.sigmas=[0.026,0.079,0.079,0.107,0.107]"


def train(overrides: list[str], log_file: Path) -> float:
    """Seconds of one `python -m dist_kp.train` run on the tiny config (its log in log_file)."""
    start = time.perf_counter()
    with log_file.open("w") as out:
        subprocess.run([sys.executable, "-m", "dist_kp.train", "--config", str(CONFIG), "train.epochs=1000",
                        "train.log_every=25", "train.workers=1", "checkpoint.every_steps=100000", *overrides],
                       check=True, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def metrics_by_step(run: Path) -> dict[int, dict[str, float]]:
    return {int(folder.name): json.loads((folder / "metrics.json").read_text())
            for folder in sorted((run / "eval").iterdir()) if (folder / "metrics.json").is_file()}


def evaluate_start(overrides: list[str], out: Path) -> dict[str, float]:
    """The metrics of the 5-joint model a fine-tuning run starts from, before its first step."""
    cfg = load_config(CONFIG, [*overrides, f"output_dir={out}"])
    store = Storage.from_config(cfg.storage)
    index = val_index(cfg, store)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, index.meta.num_keypoints, store, index.meta.keypoint_names)
    info = distributed.init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    try:
        return Evaluator(cfg, index, RunFolder(cfg.output_dir, store), info.device).run(model, step=0).metrics
    finally:
        distributed.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-steps", type=int, default=300, help="steps of the 17-keypoint source model")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps of each 5-joint run")
    parser.add_argument("--train", type=int, default=200, help="training images")
    parser.add_argument("--val", type=int, default=40, help="validation images")
    parser.add_argument("--work", help="folder to keep the data and runs in (default: a temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("dist_kp").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data17, data5 = work / "data17", work / "data5"
        if not (data5 / "annotations").is_dir():
            generate(data17, train=args.train, val=args.val, seed=0)
            generate(data5, train=args.train, val=args.val, seed=0, keypoints=FIVE)

        final = work / "source" / "model_final.pt"
        source_seconds = 0.0 if final.is_file() else train(
            [f"data.root={data17}", f"output_dir={work / 'source'}", f"train.max_steps={args.source_steps}",
             "eval.every_epochs=0", "eval.at_end=true"], work / "source.log")
        source_metrics = metrics_by_step(work / "source")[args.source_steps]
        bare = work / "source_bare.pt"  # the same tensors without the joint names
        torch.save(torch.load(final, map_location="cpu", weights_only=True)["model"], bare)

        rows: dict[str, dict[int, dict[str, float]]] = {}
        seconds: dict[str, float] = {}
        for how, name, weights in (("copied by name", "copied", final), ("re-initialised", "reinit", bare)):
            common = [f"data.root={data5}", f"model.weights={weights}", "data.min_visible_keypoints=1", FIVE_SIGMAS]
            rows[how] = {0: evaluate_start(common, work / f"{name}_step0")}
            seconds[how] = train([*common, f"output_dir={work / name}", f"train.max_steps={args.steps}",
                                  "eval.every_epochs=1", "eval.at_end=true"], work / f"{name}.log")
            rows[how].update(metrics_by_step(work / name))
            table = [line for line in (work / f"{name}.log").read_text().splitlines() if "keypoint predictor" in line]
            log.info("%s start, from the load table:\n  %s", how, "\n  ".join(table) or "(no joint lines)")

        log.info("\nsource: 17 keypoints, %d steps (%.0f s): kp/AP %.3f, bbox/AP %.3f on %d val images",
                 args.source_steps, source_seconds, source_metrics["kp/AP"], source_metrics["bbox/AP"], args.val)
        log.info("5-joint fine-tune (nose, shoulders, hips), same seed, same val images:\n")
        log.info("| step | kp/AP copied by name | kp/AP re-initialised | bbox/AP copied | bbox/AP re-initialised |")
        log.info("|---|---|---|---|---|")
        copied, reinit = rows["copied by name"], rows["re-initialised"]
        for step in sorted(set(copied) & set(reinit)):
            log.info("| %d | %.3f | %.3f | %.3f | %.3f |", step, copied[step]["kp/AP"], reinit[step]["kp/AP"],
                     copied[step]["bbox/AP"], reinit[step]["bbox/AP"])
        log.info("\nfine-tune seconds (CPU, shared): copied %.0f, re-initialised %.0f",
                 seconds["copied by name"], seconds["re-initialised"])


if __name__ == "__main__":
    main()
