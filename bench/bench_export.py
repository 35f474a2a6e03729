"""Inference images/s on the CPU: eager PyTorch vs the exported ONNX model in onnxruntime, same pictures.

    .venv/bin/python bench/bench_export.py [--configs synthetic_cpu coco_kp_r50_fpn] [--images 8] [--rounds 3]

For each config: a randomly initialised model (speed does not depend on the weights, only on the
number of detections, which both runtimes share), exported by dist_kp.export at --size, run on the
same generated pictures one at a time by both runtimes with the same number of threads, taking
turns picture by picture (median time per picture). Prints a Markdown table (images/s, ratio) and
the largest differences of the outputs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torchvision.io import decode_image
from torchvision.ops import box_iou
from torchvision.transforms.v2.functional import resize, to_dtype

from dist_kp.config import load_config
from dist_kp.data.synthetic import COCO_KEYPOINT_NAMES, COCO_SKELETON, generate
from dist_kp.export import OUTPUT_NAMES as OUTPUTS
from dist_kp.export import export
from dist_kp.model.keypoint_rcnn import build_model, weights_payload
from dist_kp.predict import load_predictor

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_export")


def images_per_s(runs: dict[str, Callable[[torch.Tensor], object]], pictures: list[torch.Tensor],
                 rounds: int) -> dict[str, float]:
    """1 / median seconds per picture of each runtime, the runtimes taking turns picture by picture.

    Taking turns and the median keep the ratio fair on a machine whose other load comes and goes.
    """
    for run in runs.values():
        run(pictures[0])  # warm-up: first-call allocations and kernel choices
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for picture in pictures:
            for name, run in runs.items():
                start = time.perf_counter()
                run(picture)
                seconds[name].append(time.perf_counter() - start)
    return {name: 1.0 / statistics.median(times) for name, times in seconds.items()}


def bench(config: str, size: tuple[int, int], pictures: list[torch.Tensor], threads: int, rounds: int,
          tmp: Path) -> None:
    cfg = load_config(REPO / "configs" / f"{config}.yaml", ["model.backbone_weights=null"]).model
    torch.manual_seed(0)
    weights = tmp / f"{config}.pt"
    meta = {"category_id": 1, "keypoint_names": COCO_KEYPOINT_NAMES, "skeleton": COCO_SKELETON}
    torch.save(weights_payload(build_model(cfg, 17), cfg, meta), weights)
    onnx_file = tmp / f"{config}.onnx"
    start = time.perf_counter()
    export(str(weights), str(onnx_file), size=size)
    export_s = time.perf_counter() - start
    model, _ = load_predictor(str(weights), torch.device("cpu"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])

    def eager(picture: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return model([picture])[0]

    def onnx(picture: torch.Tensor) -> list[np.ndarray]:
        return [np.asarray(a) for a in session.run(None, {"image": picture.numpy()})]

    speed = images_per_s({"eager": eager, "onnx": onnx}, pictures, rounds)
    eager_ips, onnx_ips = speed["eager"], speed["onnx"]
    eager_out, onnx_out = eager(pictures[0]), dict(zip(OUTPUTS, map(torch.from_numpy, onnx(pictures[0]))))
    log.info("| %s | %dx%d | %d | %.3f | %.3f | %.2f | %.0f s | %s |", config, size[0], size[1], threads,
             eager_ips, onnx_ips, onnx_ips / eager_ips, export_s, differences(eager_out, onnx_out))


def differences(eager: dict[str, torch.Tensor], exported: dict[str, torch.Tensor]) -> str:
    """Largest differences of detections paired by box (nearly equal scores may come out in the other order)."""
    if len(eager["boxes"]) != len(exported["boxes"]) or not len(eager["boxes"]):
        return f"{len(eager['boxes'])} vs {len(exported['boxes'])} detections"
    iou = box_iou(eager["boxes"], exported["boxes"])
    paired = iou.max(1).values > 0.99
    pair = iou.argmax(1)[paired]
    offset = (exported["keypoints"][pair][..., :2] - eager["keypoints"][paired][..., :2]).abs().amax(-1)
    return (f"{len(eager['boxes'])} detections, {int(paired.sum())} paired by IoU > 0.99: boxes "
            f"{(exported['boxes'][pair] - eager['boxes'][paired]).abs().max():.2g} px, scores "
            f"{(exported['scores'][pair] - eager['scores'][paired]).abs().max():.2g}, keypoints within 0.05 px "
            f"{100 * (offset <= 0.05).float().mean():.1f}% (max {offset.max():.2g} px)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["synthetic_cpu", "coco_kp_r50_fpn"])
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the pictures")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("dist_kp").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    size = (args.size[0], args.size[1])
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        root = generate(tmp / "data", train=1, val=args.images, seed=0)
        pictures = [resize(to_dtype(decode_image(str(f)), torch.float32, scale=True), list(size))
                    for f in sorted((root / "val2017").iterdir())]
        log.info("| config | input | threads | eager images/s | onnxruntime images/s | ratio | export | outputs |")
        log.info("|---|---|---|---|---|---|---|---|")
        for config in args.configs:
            bench(config, size, pictures, args.threads, args.rounds, tmp)


if __name__ == "__main__":
    main()
