"""Evaluation benchmark at val2017 scale (issue 3).

    .venv/bin/python bench/bench_eval.py [--images 5000] [--dets 20]

Generates ground truth (5,000 images, ~11,000 person annotations) and predictions (~20 per
image), then times keypoints + boxes together:
  (a) the reference scripts' way: pycocotools COCOeval.evaluate per batch of 1 image as
      predictions arrive, then merge + accumulate;
  (b) dist_kp's evaluate_distributed at 1 and 2 processes (torchrun, gloo), each backend.
Every variant's stats are checked to be identical.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_eval")
REPO = Path(__file__).resolve().parents[1]


def make_data(num_images: int, dets_per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
    from dist_kp.data.synthetic import COCO_KEYPOINT_NAMES, COCO_SKELETON

    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []
    for image_id in range(1, num_images + 1):
        w, h = (640, 480) if rng.random() < 0.6 else (480, 640)
        images.append({"id": image_id, "width": w, "height": h, "file_name": f"{image_id:012d}.jpg"})
        people = []
        for _ in range(int(rng.choice([1, 1, 2, 2, 3, 4]))):
            bw, bh = rng.uniform(30, 250), rng.uniform(60, 400)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            kps = np.stack([rng.uniform(x, x + bw, 17), rng.uniform(y, y + bh, 17), rng.choice([0, 1, 2], 17)], 1)
            kps[kps[:, 2] == 0] = 0
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                         "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)], "area": round(bw * bh * 0.6, 2),
                         "keypoints": kps.round(2).reshape(-1).tolist(), "num_keypoints": int((kps[:, 2] > 0).sum())})
            people.append(anns[-1])
        for d in range(dets_per_image):
            src = people[d % len(people)]
            x, y, bw, bh = src["bbox"]
            jitter = rng.uniform(0, 40) if d >= len(people) else rng.uniform(0, 6)
            kps = np.asarray(src["keypoints"], float).reshape(17, 3)
            kps[:, :2] += rng.normal(0, jitter, (17, 2))
            kps[:, 2] = 1
            results.append({"image_id": image_id, "category_id": 1, "score": round(float(rng.uniform(0.05, 1)), 4),
                            "bbox": [round(x + rng.normal(0, jitter), 2), round(y + rng.normal(0, jitter), 2),
                                     round(bw, 2), round(bh, 2)],
                            "keypoints": kps.round(2).reshape(-1).tolist()})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": 1, "name": "person", "keypoints": COCO_KEYPOINT_NAMES, "skeleton": COCO_SKELETON}]}
    return gt, results


def reference_style(gt_path: Path, results: list[dict]) -> dict[str, list[float]]:
    """torchvision references' CocoEvaluator: evaluate per batch of 1 image, merge, accumulate."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        by_image: dict[int, list[dict]] = {}
        for r in results:
            by_image.setdefault(r["image_id"], []).append(r)
        stats = {}
        for iou_type in ("keypoints", "bbox"):
            evaluator = COCOeval(gt, iouType=iou_type)
            img_ids, eval_imgs = [], []
            for image_id in sorted(gt.getImgIds()):
                dt = gt.loadRes(copy.deepcopy(by_image[image_id])) if image_id in by_image else COCO()
                batch = COCOeval(gt, dt, iou_type)
                batch.params.imgIds = [image_id]
                batch.evaluate()
                img_ids.append(image_id)
                eval_imgs.append(np.asarray(batch.evalImgs).reshape(-1, len(batch.params.areaRng), 1))
            merged = np.concatenate(eval_imgs, 2)
            order = np.argsort(img_ids)
            evaluator.evalImgs = list(merged[:, :, order].flatten())
            evaluator.params.imgIds = sorted(img_ids)
            evaluator._paramsEval = copy.deepcopy(evaluator.params)
            evaluator.accumulate()
            evaluator.summarize()
            stats[iou_type] = [float(s) for s in evaluator.stats]
    return stats


def worker(gt_path: str, results_path: str, backend: str, out: str) -> None:
    """One rank: its shard of the images and their results, then evaluate_distributed."""
    from dist_kp import distributed
    from dist_kp.data.coco import load_index
    from dist_kp.evaluation import evaluate_distributed

    distributed.init_distributed("cpu")
    index = load_index(gt_path)
    results = json.loads(Path(results_path).read_text())
    rank, world = distributed.get_rank(), distributed.get_world_size()
    positions = np.arange(rank, len(index), world)
    mine = {int(index.image_ids[i]) for i in positions}
    local = [r for r in results if r["image_id"] in mine]
    distributed.barrier()
    start = time.perf_counter()
    output = evaluate_distributed(index, positions, local, backend, None)
    elapsed = time.perf_counter() - start
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": elapsed, "metrics": output.metrics}))
    distributed.cleanup()


def run_dist_kp(nproc: int, backend: str, gt_path: Path, results_path: Path, tmp: Path) -> tuple[float, dict]:
    out = tmp / f"{backend}_{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           __file__, "--worker", str(gt_path), str(results_path), backend, str(out)]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True)
    data = json.loads(out.read_text())
    return data["seconds"], data["metrics"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dist_kp.evaluation import metrics_dict

    gt, results = make_data(args.images, args.dets)
    log.info("%d images, %d person annotations, %d detections", len(gt["images"]), len(gt["annotations"]), len(results))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        gt_path, results_path = tmp / "gt.json", tmp / "results.json"
        gt_path.write_text(json.dumps(gt))
        results_path.write_text(json.dumps(results))
        start = time.perf_counter()
        baseline = metrics_dict(reference_style(gt_path, results))
        base_s = time.perf_counter() - start
        rows = [("(a) reference: pycocotools per 1-image batch", base_s, baseline)]
        for backend in ("pycocotools", "faster_coco_eval"):
            for nproc in (1, 2):
                seconds, metrics = run_dist_kp(nproc, backend, gt_path, results_path, tmp)
                rows.append((f"(b) dist_kp {backend}, {nproc} process{'es' if nproc > 1 else ''}", seconds, metrics))
        log.info("| variant | seconds | speed-up vs (a) | stats identical to (a) |")
        log.info("|---|---|---|---|")
        for name, seconds, metrics in rows:
            log.info("| %s | %.1f | %.1fx | %s |", name, seconds, base_s / seconds, metrics == baseline)
        times = {name: s for name, s, _ in rows}
        for backend in ("pycocotools", "faster_coco_eval"):
            one = times[f"(b) dist_kp {backend}, 1 process"]
            two = times[f"(b) dist_kp {backend}, 2 processes"]
            log.info("%s: 2 processes are %.2fx faster than 1", backend, one / two)


if __name__ == "__main__":
    main()
