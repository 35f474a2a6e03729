"""Distributed COCO evaluation: OKS for keypoints, IoU for boxes; numbers independent of world size.

Each rank runs inference on its own unpadded shard and the per-image matching for its own
images (the expensive part); rank 0 merges the per-image results of every rank into one
accumulate/summarize. The stats equal those of pycocotools run once on all results.

Backends:
- pycocotools: each rank's COCOeval.evaluate() gives per-image match records (evalImgs);
  rank 0 concatenates them in image order and accumulates.
- faster_coco_eval: each rank computes the per-image IoU/OKS matrices (the Python hot spot of
  that library); rank 0 runs its C++ matching and accumulation on the gathered matrices.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dist_kp import distributed, storage
from dist_kp.config import COCO_KEYPOINT_SIGMAS, Config
from dist_kp.data.coco import KeypointIndex
from dist_kp.data.loaders import build_eval_loader
from dist_kp.model import unwrap

log = logging.getLogger(__name__)

STAT_NAMES = {
    "keypoints": ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"],
    "bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
}
PREFIX = {"keypoints": "kp", "bbox": "bbox"}
BACKENDS = ("faster_coco_eval", "pycocotools")


class EvaluationError(ValueError):
    """Evaluation input that cannot be used (sigmas, results file, backend)."""


@dataclass
class EvalOutput:
    """What an evaluation returns on every rank; `results` (all ranks' records) only on rank 0."""

    metrics: dict[str, float]
    results: list[dict[str, Any]] | None
    summary: str


def check_sigmas(sigmas: list[float] | None, num_keypoints: int) -> np.ndarray:
    """OKS sigmas as pycocotools stores them (divided by 10); COCO's 17 when None."""
    chosen = COCO_KEYPOINT_SIGMAS if sigmas is None else list(sigmas)
    if len(chosen) != num_keypoints:
        source = "COCO's default" if sigmas is None else "eval.sigmas"
        raise EvaluationError(
            f"{source} has {len(chosen)} OKS sigmas but the dataset has {num_keypoints} keypoints; "
            f"set eval.sigmas (or --sigmas) to {num_keypoints} values, one per keypoint"
        )
    if any(s <= 0 for s in chosen):
        raise EvaluationError(f"OKS sigmas must be positive, got {chosen}")
    return np.asarray(chosen, np.float64) / 10.0


def ground_truth(index: KeypointIndex, positions: np.ndarray | None = None) -> dict[str, Any]:
    """A COCO ground-truth dict for some images of the index (all when positions is None)."""
    positions = np.arange(len(index)) if positions is None else positions
    images, annotations = [], []
    for i in positions.tolist():
        image_id = int(index.image_ids[i])
        images.append({"id": image_id, "width": int(index.widths[i]), "height": int(index.heights[i]),
                       "file_name": index.file_names[i]})
        rows = index.annotation_rows(i)
        for j in range(rows.start, rows.stop):
            keypoints = index.keypoints[j]
            annotations.append({
                "id": int(index.ann_ids[j]), "image_id": image_id, "category_id": index.meta.category_id,
                "bbox": [float(v) for v in index.boxes[j]], "area": float(index.areas[j]),
                "iscrowd": int(index.iscrowd[j]), "keypoints": [float(v) for v in keypoints.reshape(-1)],
                "num_keypoints": int((keypoints[:, 2] > 0).sum()),
            })
    categories = [{"id": index.meta.category_id, "name": "person", "keypoints": index.meta.keypoint_names,
                   "skeleton": index.meta.skeleton}]
    return {"images": images, "annotations": annotations, "categories": categories}


def outputs_to_results(
    outputs: list[dict[str, torch.Tensor]], image_ids: list[int], category_id: int
) -> list[dict[str, Any]]:
    """COCO result records (bbox xywh, flat keypoints x, y, v, score) from model outputs."""
    records = []
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].detach().cpu().double()
        boxes[:, 2:] -= boxes[:, :2]
        keypoints = output["keypoints"].detach().cpu().double()
        keypoints[..., 2] = 1.0  # torchvision's predicted visibility is always 1
        for box, kps, score in zip(boxes.tolist(), keypoints.reshape(len(boxes), -1).tolist(),
                                   output["scores"].detach().cpu().tolist()):
            records.append({"image_id": int(image_id), "category_id": category_id,
                            "bbox": [round(v, 2) for v in box], "keypoints": [round(v, 2) for v in kps],
                            "score": round(float(score), 4)})
    return records


@torch.no_grad()
def predict(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
            category_id: int) -> list[dict[str, Any]]:
    """This rank's COCO result records for every image of its loader (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    try:
        for images, targets, _ in loader:
            # One image per forward: batching pads images to a common size, which changes the
            # predictions, and the batches of a shard depend on the world size.
            for image, target in zip(images, targets):
                image = image.to(device, non_blocking=device.type == "cuda").float().div_(255.0)
                records += outputs_to_results(model([image]), [int(target["image_id"])], category_id)
    finally:
        model.train(was_training)
    return records


def _api(backend: str) -> tuple[type, type]:
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        return COCO, COCOeval
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster
        return COCO, COCOeval_faster
    raise EvaluationError(f"unknown evaluation backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _coco(backend: str, dataset: dict[str, Any]) -> Any:
    coco_cls, _ = _api(backend)
    coco = coco_cls()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _detections(backend: str, gt: Any, results: list[dict[str, Any]]) -> Any:
    """The detections as the backend's loadRes builds them; an empty list gives an empty set."""
    if not results:
        return _coco(backend, {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                               "annotations": []})
    with contextlib.redirect_stdout(io.StringIO()):
        # loadRes adds keys to each record but leaves its lists alone: a shallow copy suffices.
        return gt.loadRes([dict(r) for r in results])


def _evaluator(backend: str, gt: Any, dt: Any, iou_type: str, sigmas: np.ndarray, image_ids: list[int],
               cat_ids: list[int]) -> Any:
    _, eval_cls = _api(backend)
    kwargs = {"print_function": lambda *a, **k: None} if backend == "faster_coco_eval" else {}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = eval_cls(gt, dt, iou_type, **kwargs)
    evaluator.params.imgIds = sorted(image_ids)
    evaluator.params.catIds = sorted(cat_ids)
    if iou_type == "keypoints":
        evaluator.params.kpt_oks_sigmas = sigmas
    return evaluator


def match_images(backend: str, gt: Any, dt: Any, iou_type: str, sigmas: np.ndarray,
                 image_ids: list[int]) -> dict[str, Any]:
    """Per-image matching of this rank's images: the backend's per-image records, picklable."""
    evaluator = _evaluator(backend, gt, dt, iou_type, sigmas, image_ids, gt.getCatIds())
    if backend == "faster_coco_eval":
        evaluator.separate_eval = True  # keep the C++ per-image records instead of accumulating here
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
    records = evaluator.evalImgs if backend == "pycocotools" else evaluator._evalImgs_cpp
    return {"image_ids": list(evaluator.params.imgIds), "cat_ids": list(evaluator.params.catIds),
            "eval_imgs": records}


def merge_and_summarize(backend: str, iou_type: str, sigmas: np.ndarray, parts: list[dict[str, Any]],
                        num_results: int) -> list[float]:
    """One accumulate/summarize over every rank's per-image records; the backend's stats vector.

    Records are laid out [category][area range][image]; the ranks' blocks are joined along the
    image axis and put in image-id order, which is what one process would have produced.
    """
    if num_results == 0:
        return [0.0] * len(STAT_NAMES[iou_type])
    image_ids = sorted(i for part in parts for i in part["image_ids"])
    cat_ids = sorted({c for part in parts for c in part["cat_ids"]})
    evaluator = _evaluator(backend, None, None, iou_type, sigmas, image_ids, cat_ids)
    p = evaluator.params
    p.maxDets = sorted(p.maxDets)
    grids = [np.asarray(part["eval_imgs"], dtype=object).reshape(len(p.catIds), len(p.areaRng), -1)
             for part in parts]
    order = np.argsort(np.concatenate([np.asarray(part["image_ids"], np.int64) for part in parts]), kind="stable")
    merged = list(np.concatenate(grids, axis=2)[:, :, order].flatten())
    evaluator._paramsEval = copy.deepcopy(p)
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "pycocotools":
            evaluator.evalImgs = merged
            evaluator.accumulate()
        else:
            from faster_coco_eval.core.faster_eval_api import _C

            evaluator.eval = _C.COCOevalAccumulate(evaluator._paramsEval, merged)
        evaluator.summarize()
    return [float(s) for s in evaluator.stats]


SUMMARY_ROWS = {
    "keypoints": [("Precision", "0.50:0.95", "all", 20), ("Precision", "0.50", "all", 20),
                  ("Precision", "0.75", "all", 20), ("Precision", "0.50:0.95", "medium", 20),
                  ("Precision", "0.50:0.95", "large", 20), ("Recall", "0.50:0.95", "all", 20),
                  ("Recall", "0.50", "all", 20), ("Recall", "0.75", "all", 20),
                  ("Recall", "0.50:0.95", "medium", 20), ("Recall", "0.50:0.95", "large", 20)],
    "bbox": [("Precision", "0.50:0.95", "all", 100), ("Precision", "0.50", "all", 100),
             ("Precision", "0.75", "all", 100), ("Precision", "0.50:0.95", "small", 100),
             ("Precision", "0.50:0.95", "medium", 100), ("Precision", "0.50:0.95", "large", 100),
             ("Recall", "0.50:0.95", "all", 1), ("Recall", "0.50:0.95", "all", 10),
             ("Recall", "0.50:0.95", "all", 100), ("Recall", "0.50:0.95", "small", 100),
             ("Recall", "0.50:0.95", "medium", 100), ("Recall", "0.50:0.95", "large", 100)],
}


def summary_text(iou_type: str, stats: list[float]) -> str:
    """The standard COCO summary lines for a stats vector."""
    lines = [f"{'keypoints (OKS)' if iou_type == 'keypoints' else 'bbox (IoU)'}:"]
    for (kind, iou, area, dets), value in zip(SUMMARY_ROWS[iou_type], stats):
        short = "(AP)" if kind == "Precision" else "(AR)"
        lines.append(f" Average {kind:<9} {short} @[ IoU={iou:<9} | area={area:>6s} | maxDets={dets:>3d} ] = {value:0.3f}")
    return "\n".join(lines)


def metrics_dict(stats: dict[str, list[float]]) -> dict[str, float]:
    return {f"{PREFIX[t]}/{name}": value for t, values in stats.items() for name, value in zip(STAT_NAMES[t], values)}


def evaluate_results(
    gt_dataset: dict[str, Any], results: list[dict[str, Any]], backend: str, sigmas: list[float] | None,
    iou_types: tuple[str, ...] = ("keypoints", "bbox"),
) -> EvalOutput:
    """Evaluate one complete results list in this process (used for external results files)."""
    category = gt_dataset["categories"][0]
    num_keypoints = len(category.get("keypoints", [])) or len(COCO_KEYPOINT_SIGMAS)
    oks_sigmas = check_sigmas(sigmas, num_keypoints)
    gt = _coco(backend, gt_dataset)
    dt = _detections(backend, gt, results)
    image_ids = sorted(gt.getImgIds())
    stats = {}
    for iou_type in iou_types:
        part = match_images(backend, gt, dt, iou_type, oks_sigmas, image_ids)
        stats[iou_type] = merge_and_summarize(backend, iou_type, oks_sigmas, [part], len(results))
    return EvalOutput(metrics_dict(stats), results, "\n".join(summary_text(t, v) for t, v in stats.items()))


def evaluate_distributed(
    index: KeypointIndex, local_positions: np.ndarray, local_results: list[dict[str, Any]], backend: str,
    sigmas: list[float] | None,
) -> EvalOutput:
    """Match this rank's images, merge on rank 0, and give every rank the metrics."""
    oks_sigmas = check_sigmas(sigmas, index.meta.num_keypoints)
    local_gt = _coco(backend, ground_truth(index, local_positions))
    local_dt = _detections(backend, local_gt, local_results)
    local_ids = [int(index.image_ids[i]) for i in local_positions.tolist()]
    parts = {t: match_images(backend, local_gt, local_dt, t, oks_sigmas, local_ids) for t in STAT_NAMES}
    gathered = distributed.gather_objects((parts, local_results))
    output = None
    if gathered is not None:
        results = [r for _, rank_results in gathered for r in rank_results]
        stats = {
            iou_type: merge_and_summarize(backend, iou_type, oks_sigmas,
                                          [rank_parts[iou_type] for rank_parts, _ in gathered], len(results))
            for iou_type in STAT_NAMES
        }
        output = EvalOutput(metrics_dict(stats), results, "\n".join(summary_text(t, v) for t, v in stats.items()))
    metrics = distributed.broadcast_object(output.metrics if output else None)
    return output or EvalOutput(metrics, None, "")


def write_outputs(output_dir: str, step: int, output: EvalOutput) -> str:
    """results.json and metrics.json under OUTPUT_DIR/eval/<step>/ (rank 0); returns the folder URL."""
    folder = f"{output_dir.rstrip('/')}/eval/{step:08d}"
    fs, path = storage.url_to_fs(folder)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/results.json", "w") as f:
        json.dump(output.results or [], f)
    with fs.open(f"{path}/metrics.json", "w") as f:
        json.dump({"step": step, **output.metrics}, f, indent=1)
    return folder


def evaluate_model(model: nn.Module, cfg: Config, index: KeypointIndex, device: torch.device, step: int) -> EvalOutput:
    """Inference on this rank's shard of the validation set, then the merged COCO evaluation.

    Rank 0 logs both summaries and writes results.json and metrics.json under
    OUTPUT_DIR/eval/<step>/; every rank gets the metrics dict.
    """
    loader = build_eval_loader(cfg, index, distributed.get_rank(), distributed.get_world_size(), device)
    positions = np.asarray(loader.dataset.indices, np.int64)
    results = predict(unwrap(model), loader, device, index.meta.category_id)
    output = evaluate_distributed(index, positions, results, cfg.eval.backend, cfg.eval.sigmas)
    if distributed.is_main_process():
        folder = write_outputs(cfg.output_dir, step, output)
        log.info("evaluation at step %d (%d images, %d detections, %s):\n%s\nwritten to %s", step,
                 len(index) if cfg.eval.max_images is None else min(cfg.eval.max_images, len(index)),
                 len(output.results or []), cfg.eval.backend, output.summary, folder)
    return output
