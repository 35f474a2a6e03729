"""COCO result records: from model outputs, checked when they come from a file, and the ground truth.

A results list that COCO evaluation cannot take is refused naming the source, the first bad
record and the rule (`check_results`); OKS sigmas are checked against the skeleton (`check_sigmas`).
A rank sends its records to rank 0 as arrays, one per field (`ResultColumns`).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dist_kp.config import COCO_KEYPOINT_SIGMAS, oks_sigma_problem
from dist_kp.data.index import KeypointIndex

if TYPE_CHECKING:  # only for annotations: `evaluate --results` imports this module and must not import torch
    import torch

log = logging.getLogger(__name__)


class EvaluationError(ValueError):
    """Evaluation input that cannot be used (sigmas, results file, backend)."""


def check_sigmas(sigmas: list[float] | None, num_keypoints: int) -> np.ndarray:
    """The true OKS sigmas (pycocotools' params.kpt_oks_sigmas): the given ones, COCO's 17 when None.

    Refused: another count than the skeleton's keypoints, and values outside (0, MAX_OKS_SIGMA]
    (the message names pycocotools' x10 source form, .26 for 0.026).
    """
    chosen = COCO_KEYPOINT_SIGMAS if sigmas is None else list(sigmas)
    if len(chosen) != num_keypoints:
        source = "COCO's default" if sigmas is None else "eval.sigmas"
        raise EvaluationError(
            f"{source} has {len(chosen)} OKS sigmas but the dataset has {num_keypoints} keypoints; "
            f"set eval.sigmas (or --sigmas) to {num_keypoints} values, one per keypoint"
        )
    problem = oks_sigma_problem(chosen)
    if problem:
        raise EvaluationError(f"eval.sigmas (or --sigmas): {problem}")
    return np.asarray(chosen, np.float64)


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
        return np.concatenate([output[key].detach().cpu().double().numpy() for output in outputs])

    boxes, keypoints, scores = joined("boxes"), joined("keypoints"), joined("scores")
    boxes[:, 2:] -= boxes[:, :2]
    keypoints[..., 2] = 1.0  # torchvision's predicted visibility is always 1
    ids = np.repeat(np.asarray(image_ids, np.int64), counts).tolist()
    return [{"image_id": image_id, "category_id": category_id, "bbox": box, "keypoints": kps, "score": score}
            for image_id, box, kps, score in zip(ids, round_half_even(boxes, 2).tolist(),
                                                 round_half_even(keypoints.reshape(len(ids), -1), 2).tolist(),
                                                 round_half_even(scores, 4).tolist())]


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while many containers are built at once (they hold no cycles).

    Each collection walks every container still alive, so building N records costs O(N^2) without this.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


RESULT_KEYS = ("image_id", "category_id", "bbox", "keypoints", "score")  # outputs_to_results' records, in order


@dataclass
class ResultColumns:
    """COCO result records as outputs_to_results makes them, one array per field: what a rank sends
    to rank 0 (a few buffers to pickle, not a Python object per value)."""

    image_ids: np.ndarray  # int64
    category_ids: np.ndarray  # int64
    boxes: np.ndarray  # float64 (N, 4)
    keypoints: np.ndarray  # float64 (N, 3 x keypoints)
    scores: np.ndarray  # float64

    @classmethod
    def from_records(cls, results: list[dict[str, Any]]) -> ResultColumns:
        """The records' arrays; a record with other keys than outputs_to_results' is refused (it would be lost)."""
        other = next((i for i, r in enumerate(results) if r.keys() != set(RESULT_KEYS)), None)
        if other is not None:
            raise EvaluationError(f"result record {other} {_record_text(results[other])} has other keys than "
                                  f"{', '.join(RESULT_KEYS)}: it cannot be sent to rank 0 as arrays")
        n = len(results)
        width = len(results[0]["keypoints"]) if n else 0

        def flat(key: str, size: int) -> np.ndarray:
            return np.fromiter(itertools.chain.from_iterable(r[key] for r in results), np.float64, n * size)

        return cls(np.fromiter((r["image_id"] for r in results), np.int64, n),
                   np.fromiter((r["category_id"] for r in results), np.int64, n),
                   flat("bbox", 4).reshape(n, 4), flat("keypoints", width).reshape(n, width),
                   np.fromiter((r["score"] for r in results), np.float64, n))

    def records(self) -> list[dict[str, Any]]:
        """The records again, equal to the ones sent (values and types; keys in outputs_to_results' order)."""
        with paused_gc():
            return [{"image_id": image_id, "category_id": category_id, "bbox": box, "keypoints": kps, "score": score}
                    for image_id, category_id, box, kps, score in zip(
                        self.image_ids.tolist(), self.category_ids.tolist(), self.boxes.tolist(),
                        self.keypoints.tolist(), self.scores.tolist())]


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
