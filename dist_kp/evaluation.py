"""Distributed COCO evaluation: OKS for keypoints, IoU for boxes; numbers independent of world size.

Each rank runs inference on its own unpadded shard and the per-image matching for its own
images (the expensive part); rank 0 merges the per-image results of every rank into one
accumulate/summarize. What "exact" means here:

- the stats do not depend on the number of processes: 1, 2, 3 ... ranks give bit-identical numbers;
- the pycocotools backend gives bit for bit what pycocotools run once on all results gives;
- faster_coco_eval matches the same pairs but accumulates in C++ in another order, so its stats
  may differ from pycocotools' in the last bit (depending on the CPU); they agree within 1e-12.

Keypoint stats follow the COCO keypoint protocol: a detection's area (which decides whether it
counts as medium or large) is the area of its keypoints' extent, as pycocotools' loadRes computes
it for keypoint results, even when the record also carries a box (`keypoint_area="box"` takes the
box's area instead, detectron2's convention). The box evaluation always uses the boxes.

One class per backend (`backend_for(name)`) wraps the library behind coco / detections / match /
merge. The internals still relied upon (the per-image record layout, pycocotools' `_paramsEval`,
faster_coco_eval's `_evalImgs_cpp`) are checked by tests/test_eval_backends.py.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from dist_kp import distributed
from dist_kp.config import COCO_KEYPOINT_SIGMAS, Config
from dist_kp.data.index import KeypointIndex
from dist_kp.data.loaders import build_eval_loader
from dist_kp.model import unwrap
from dist_kp.precision import autocast
from dist_kp.run_folder import EVAL_METRICS, EVAL_RESULTS, RunFolder

log = logging.getLogger(__name__)

STAT_NAMES = {
    "keypoints": ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"],
    "bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
}
PREFIX = {"keypoints": "kp", "bbox": "bbox"}
KEYPOINT_AREAS = ("keypoints", "box")


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
    positions = np.arange(len(index)) if positions is None else np.asarray(positions, np.int64)
    starts, stops = index.ann_offsets[positions], index.ann_offsets[positions + 1]
    rows = np.concatenate([np.arange(a, b) for a, b in zip(starts.tolist(), stops.tolist())] or [np.zeros(0, np.int64)])
    image_ids = index.image_ids[positions].tolist()
    images = [{"id": i, "width": w, "height": h, "file_name": index.file_names[p]}
              for i, w, h, p in zip(image_ids, index.widths[positions].tolist(), index.heights[positions].tolist(),
                                    positions.tolist())]
    keypoints = index.keypoints[rows]
    category_id = index.meta.category_id
    annotations = [
        {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": box, "area": area, "iscrowd": crowd,
         "keypoints": kps, "num_keypoints": visible}
        for ann_id, image_id, box, area, crowd, kps, visible in zip(
            index.ann_ids[rows].tolist(), np.repeat(image_ids, stops - starts).tolist(), index.boxes[rows].tolist(),
            index.areas[rows].tolist(), index.iscrowd[rows].astype(np.int64).tolist(),
            keypoints.reshape(len(rows), keypoints.shape[1] * 3).tolist(), (keypoints[:, :, 2] > 0).sum(axis=1).tolist())
    ]
    categories = [{"id": category_id, "name": "person", "keypoints": index.meta.keypoint_names,
                   "skeleton": index.meta.skeleton}]
    return {"images": images, "annotations": annotations, "categories": categories}


def round_half_even(values: np.ndarray, ndigits: int) -> np.ndarray:
    """Python's round(v, ndigits) of every element (the double nearest the correctly rounded decimal)."""
    scale = 10.0**ndigits
    scaled = values * scale
    rounded = np.rint(scaled) / scale
    # rint of the scaled double can round otherwise than the exact value only next to a tie.
    with np.errstate(invalid="ignore"):  # inf and nan are never near a tie
        near_tie = np.abs(scaled - np.floor(scaled) - 0.5) <= 4 * np.spacing(np.abs(scaled))
    for pos in np.flatnonzero(near_tie).tolist():
        rounded.flat[pos] = round(float(values.flat[pos]), ndigits)
    return rounded


def outputs_to_results(
    outputs: list[dict[str, torch.Tensor]], image_ids: list[int], category_id: int
) -> list[dict[str, Any]]:
    """COCO result records (bbox xywh, flat keypoints x, y, v, score) from model outputs, one batch at once."""
    counts = [len(output["scores"]) for output in outputs]
    if not sum(counts):
        return []

    def joined(key: str) -> np.ndarray:
        return torch.cat([output[key].detach().cpu() for output in outputs]).double().numpy()

    boxes, keypoints, scores = joined("boxes"), joined("keypoints"), joined("scores")
    boxes[:, 2:] -= boxes[:, :2]
    keypoints[..., 2] = 1.0  # torchvision's predicted visibility is always 1
    ids = np.repeat(np.asarray(image_ids, np.int64), counts).tolist()
    return [{"image_id": image_id, "category_id": category_id, "bbox": box, "keypoints": kps, "score": score}
            for image_id, box, kps, score in zip(ids, round_half_even(boxes, 2).tolist(),
                                                 round_half_even(keypoints.reshape(len(ids), -1), 2).tolist(),
                                                 round_half_even(scores, 4).tolist())]


@torch.no_grad()
def predict(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
            category_id: int, precision: str = "fp32") -> list[dict[str, Any]]:
    """This rank's COCO result records for every image of its loader (eval mode, no grad, autocast to `precision`)."""
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    try:
        for images, targets, _ in loader:
            # One image per forward: batching pads images to a common size, which changes the
            # predictions, and the batches of a shard depend on the world size.
            with autocast(precision, device):
                outputs = [model([image.to(device, non_blocking=device.type == "cuda").float().div_(255.0)])[0]
                           for image in images]
            outputs = [{k: v.float() if v.is_floating_point() else v for k, v in o.items()} for o in outputs]
            records += outputs_to_results(outputs, [int(t["image_id"]) for t in targets], category_id)
    finally:
        model.train(was_training)
    return records


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Both libraries print progress to stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@dataclass
class ImageMatches:
    """One rank's per-image matching records for one iou type, laid out [category][area range][image]."""

    image_ids: list[int]
    cat_ids: list[int]
    records: list[Any]
    num_detections: int


class EvalBackend:
    """One COCO evaluation library: ground truth, detections, per-image matching, one merged accumulate.

    A subclass names the library's COCO and COCOeval classes and says how its per-image records
    are read after evaluate() and handed back to accumulate().
    """

    name: ClassVar[str]

    def classes(self) -> tuple[type, type]:
        """The library's COCO and COCOeval classes (imported on first use)."""
        raise NotImplementedError

    def evaluator_options(self) -> dict[str, Any]:
        return {}

    def per_image_records(self, evaluator: Any) -> list[Any]:
        """Run evaluate() and return its per-image records."""
        raise NotImplementedError

    def accumulate(self, evaluator: Any, records: list[Any]) -> None:
        """Run accumulate() on per-image records from any number of evaluate() calls."""
        raise NotImplementedError

    def coco(self, dataset: dict[str, Any]) -> Any:
        """The library's COCO object for a ground-truth dict (no file needed)."""
        coco = self.classes()[0]()
        coco.dataset = dataset
        with _quiet():
            coco.createIndex()
        return coco

    def detections(self, gt: Any, results: list[dict[str, Any]], boxes: bool = True) -> Any:
        """The detections as the library's loadRes builds them; an empty list gives an empty set.

        boxes=False hands loadRes the records without their boxes: it then takes each detection's
        area from its keypoints' extent, as for COCO keypoint results.
        """
        if not results:
            return self.coco({"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                              "annotations": []})
        # loadRes adds keys to each record but leaves its lists alone: a shallow copy suffices.
        records = [dict(r) for r in results] if boxes else [{k: v for k, v in r.items() if k != "bbox"}
                                                            for r in results]
        with _quiet():
            return gt.loadRes(records)

    def evaluator(self, gt: Any, dt: Any, iou_type: str, sigmas: np.ndarray | None, image_ids: list[int],
                  cat_ids: list[int]) -> Any:
        with _quiet():
            evaluator = self.classes()[1](gt, dt, iou_type, **self.evaluator_options())
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.params.catIds = sorted(cat_ids)
        if iou_type == "keypoints" and sigmas is not None:
            evaluator.params.kpt_oks_sigmas = sigmas
        return evaluator

    def match(self, gt: Any, dt: Any, iou_type: str, sigmas: np.ndarray, image_ids: list[int]) -> ImageMatches:
        """Per-image matching of this rank's images: the library's per-image records, picklable."""
        evaluator = self.evaluator(gt, dt, iou_type, sigmas, image_ids, gt.getCatIds())
        with _quiet():
            records = self.per_image_records(evaluator)
        return ImageMatches([int(i) for i in evaluator.params.imgIds], [int(c) for c in evaluator.params.catIds],
                            list(records), len(dt.getAnnIds()))

    def merge(self, iou_type: str, parts: list[ImageMatches]) -> list[float]:
        """One accumulate/summarize over every rank's per-image records; the library's stats vector.

        The ranks' blocks are joined along the image axis and put in image-id order, which is what
        one process would have produced.
        """
        if not sum(part.num_detections for part in parts):
            return [0.0] * len(STAT_NAMES[iou_type])
        image_ids = sorted(i for part in parts for i in part.image_ids)
        cat_ids = sorted({c for part in parts for c in part.cat_ids})
        evaluator = self.evaluator(None, None, iou_type, None, image_ids, cat_ids)
        p = evaluator.params
        p.maxDets = sorted(p.maxDets)
        grids = [np.asarray(part.records, dtype=object).reshape(len(p.catIds), len(p.areaRng), -1) for part in parts]
        order = np.argsort(np.concatenate([np.asarray(part.image_ids, np.int64) for part in parts]), kind="stable")
        merged = list(np.concatenate(grids, axis=2)[:, :, order].flatten())
        evaluator._paramsEval = copy.deepcopy(p)  # what accumulate reads; evaluate() would have set it
        with _quiet():
            self.accumulate(evaluator, merged)
            evaluator.summarize()
        return [float(s) for s in evaluator.stats]


class PycocotoolsBackend(EvalBackend):
    """pycocotools: per-image records are the dicts of `COCOeval.evalImgs`."""

    name = "pycocotools"

    def classes(self) -> tuple[type, type]:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval

    def per_image_records(self, evaluator: Any) -> list[Any]:
        evaluator.evaluate()
        return evaluator.evalImgs

    def accumulate(self, evaluator: Any, records: list[Any]) -> None:
        evaluator.evalImgs = records
        evaluator.accumulate()


class FasterCocoEvalBackend(EvalBackend):
    """faster_coco_eval: with separate_eval, evaluate() keeps its C++ per-image records for accumulate()."""

    name = "faster_coco_eval"

    def classes(self) -> tuple[type, type]:
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster

    def evaluator_options(self) -> dict[str, Any]:
        return {"print_function": lambda *a, **k: None, "separate_eval": True}

    def per_image_records(self, evaluator: Any) -> list[Any]:
        evaluator.evaluate()
        return evaluator._evalImgs_cpp

    def accumulate(self, evaluator: Any, records: list[Any]) -> None:
        evaluator._evalImgs_cpp = records
        evaluator.accumulate()


_BACKENDS: dict[str, type[EvalBackend]] = {b.name: b for b in (FasterCocoEvalBackend, PycocotoolsBackend)}
BACKENDS = tuple(_BACKENDS)


def backend_for(name: str) -> EvalBackend:
    """The backend called `name` (eval.backend)."""
    if name not in _BACKENDS:
        raise EvaluationError(f"unknown evaluation backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return _BACKENDS[name]()


def detection_sets(backend: EvalBackend, gt: Any, results: list[dict[str, Any]], iou_types: tuple[str, ...],
                   keypoint_area: str = "keypoints") -> dict[str, Any]:
    """The detections each evaluation sees: boxes with their own area; keypoints with the keypoints' extent.

    keypoint_area="box" gives the keypoint evaluation the box's area (detectron2's convention).
    """
    if keypoint_area not in KEYPOINT_AREAS:
        raise EvaluationError(f"unknown keypoint_area {keypoint_area!r}; choose one of {', '.join(KEYPOINT_AREAS)}")
    with_boxes = any("bbox" in r for r in results)
    built: dict[bool, Any] = {}  # one loadRes per kind of area, shared by the iou types that use it
    for iou_type in iou_types:
        boxes = iou_type == "bbox" or keypoint_area == "box" or not with_boxes
        if boxes not in built:
            built[boxes] = backend.detections(gt, results, boxes=boxes)
    return {t: built[t == "bbox" or keypoint_area == "box" or not with_boxes] for t in iou_types}


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


def _record_text(record: Any) -> str:
    text = json.dumps(record, default=str)
    return text if len(text) <= 160 else text[:157] + "..."


def check_results(results: Any, source: str, image_ids: set[int], category_id: int, num_keypoints: int,
                  annotations: str = "the annotations") -> None:
    """Refuse a results list that COCO evaluation cannot take, naming `source`, the first bad record and the rule.

    Every record needs image_id (an image of the annotations), category_id, keypoints
    (3 x num_keypoints finite numbers) and a finite score; a bbox, if any record has one, is in
    every record (4 finite numbers, width and height >= 0). Records of another category than
    `category_id` are counted for nothing: a warning gives their number and the first one.
    """
    if not isinstance(results, list):
        raise EvaluationError(
            f"{source}: expected a JSON list of COCO result records, got a JSON {type(results).__name__}")

    def refuse(i: int, rule: str) -> None:
        raise EvaluationError(f"{source}: record {i} {_record_text(results[i])}: {rule}")

    def is_number(v: Any) -> bool:
        return type(v) in (int, float)

    has_box = any(type(r) is dict and "bbox" in r for r in results)
    required = {"image_id", "category_id", "keypoints", "score"} | ({"bbox"} if has_box else set())
    for i, r in enumerate(results):
        if type(r) is not dict:
            refuse(i, "a result record is a JSON object")
        missing = required - r.keys()
        if missing:
            extra = "; a bbox is in every record or in none" if missing == {"bbox"} else ""
            refuse(i, f"has no {', '.join(sorted(missing))}{extra}")
        if type(r["image_id"]) is not int or r["image_id"] not in image_ids:
            refuse(i, f"image_id {r['image_id']!r} is not the id of an image of {annotations}")
        if type(r["category_id"]) is not int:
            refuse(i, "category_id is an integer")
        if not is_number(r["score"]) or not math.isfinite(r["score"]):
            refuse(i, "score is a finite number")
        kps = r["keypoints"]
        if type(kps) is not list or len(kps) != 3 * num_keypoints:
            got = f"{len(kps)} values" if type(kps) is list else f"a JSON {type(kps).__name__}"
            refuse(i, f"keypoints has {got}, expected {3 * num_keypoints} ({num_keypoints} keypoints x (x, y, v))")
        if has_box:
            box = r["bbox"]
            if type(box) is not list or len(box) != 4 or not all(is_number(v) for v in box):
                refuse(i, "bbox is 4 numbers [x, y, width, height]")
    # Element checks over all records at once: one pass through numpy instead of per-value Python.
    for key, rule in (("keypoints", "keypoints are finite numbers"), ("bbox", "bbox values are finite numbers")):
        if not results or (key == "bbox" and not has_box):
            continue
        values = np.asarray([r[key] for r in results])
        if values.dtype.kind not in "biuf":
            refuse(next(i for i, r in enumerate(results) if not all(is_number(v) for v in r[key])), rule)
        finite = np.isfinite(values).all(axis=1)
        if not finite.all():
            refuse(int(np.argmin(finite)), rule)
        if key == "bbox" and (values[:, 2:] < 0).any():
            refuse(int(np.argmax((values[:, 2:] < 0).any(axis=1))), "bbox width and height are >= 0")
    others = [i for i, r in enumerate(results) if r["category_id"] != category_id]
    if others:
        log.warning("%s: %d of %d results have a category_id that is not the keypoint category of %s (%d) and "
                    "count for nothing; the first is record %d %s", source, len(others), len(results), annotations,
                    category_id, others[0], _record_text(results[others[0]]))


def evaluate_results(
    gt_dataset: dict[str, Any], results: list[dict[str, Any]], backend: str, sigmas: list[float] | None,
    iou_types: tuple[str, ...] = ("keypoints", "bbox"), keypoint_area: str = "keypoints",
) -> EvalOutput:
    """Evaluate one complete results list in this process (used for external results files)."""
    category = gt_dataset["categories"][0]
    num_keypoints = len(category.get("keypoints", [])) or len(COCO_KEYPOINT_SIGMAS)
    oks_sigmas = check_sigmas(sigmas, num_keypoints)
    library = backend_for(backend)
    gt = library.coco(gt_dataset)
    dts = detection_sets(library, gt, results, iou_types, keypoint_area)
    image_ids = sorted(gt.getImgIds())
    stats = {t: library.merge(t, [library.match(gt, dts[t], t, oks_sigmas, image_ids)]) for t in iou_types}
    return EvalOutput(metrics_dict(stats), results, "\n".join(summary_text(t, v) for t, v in stats.items()))


def evaluate_distributed(
    index: KeypointIndex, local_positions: np.ndarray, local_results: list[dict[str, Any]], backend: str,
    sigmas: list[float] | None, keypoint_area: str = "keypoints",
) -> EvalOutput:
    """Match this rank's images, merge on rank 0, and give every rank the metrics."""
    oks_sigmas = check_sigmas(sigmas, index.meta.num_keypoints)
    library = backend_for(backend)
    local_gt = library.coco(ground_truth(index, local_positions))
    local_dts = detection_sets(library, local_gt, local_results, tuple(STAT_NAMES), keypoint_area)
    local_ids = [int(index.image_ids[i]) for i in local_positions.tolist()]
    parts = {t: library.match(local_gt, local_dts[t], t, oks_sigmas, local_ids) for t in STAT_NAMES}
    gathered = distributed.gather_objects((parts, local_results))
    output = None
    if gathered is not None:
        results = [r for _, rank_results in gathered for r in rank_results]
        stats = {t: library.merge(t, [rank_parts[t] for rank_parts, _ in gathered]) for t in STAT_NAMES}
        output = EvalOutput(metrics_dict(stats), results, "\n".join(summary_text(t, v) for t, v in stats.items()))
    metrics = distributed.broadcast_object(output.metrics if output else None)
    return output or EvalOutput(metrics, None, "")


def write_outputs(folder: RunFolder, step: int, output: EvalOutput) -> str:
    """results.json and metrics.json under OUTPUT_DIR/eval/<step>/ (rank 0); returns the folder URL."""
    folder.write(folder.eval_file(step, EVAL_RESULTS), json.dumps(output.results or []).encode())
    folder.write(folder.eval_file(step, EVAL_METRICS), json.dumps({"step": step, **output.metrics}, indent=1).encode())
    return folder.eval_folder(step)


def evaluate_model(model: nn.Module, cfg: Config, index: KeypointIndex, device: torch.device, step: int) -> EvalOutput:
    """Inference on this rank's shard of the validation set, then the merged COCO evaluation.

    Rank 0 logs both summaries and writes results.json and metrics.json under
    OUTPUT_DIR/eval/<step>/; every rank gets the metrics dict.
    """
    loader = build_eval_loader(cfg, index, distributed.get_rank(), distributed.get_world_size(), device)
    positions = np.asarray(loader.dataset.indices, np.int64)
    results = predict(unwrap(model), loader, device, index.meta.category_id, cfg.train.precision)
    output = evaluate_distributed(index, positions, results, cfg.eval.backend, cfg.eval.sigmas, cfg.eval.keypoint_area)
    if distributed.is_main_process():
        folder = write_outputs(RunFolder.for_config(cfg), step, output)
        log.info("evaluation at step %d (%d images, %d detections, %s):\n%s\nwritten to %s", step,
                 len(index) if cfg.eval.max_images is None else min(cfg.eval.max_images, len(index)),
                 len(output.results or []), cfg.eval.backend, output.summary, folder)
    return output
