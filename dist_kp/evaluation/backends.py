"""One class per COCO evaluation library, behind one interface: coco / detections / match / merge.

A rank other than 0 sends its per-image records as arrays (`columns`, `MatchColumns`); rank 0
turns them back into the library's records (`from_columns`) once, for the merge.

The internals still relied upon (the per-image record layout, pycocotools' `_paramsEval`,
faster_coco_eval's `_evalImgs_cpp` and its records' pickle state, the fields accumulate() reads)
are checked by tests/test_eval_backends.py.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from dist_kp.evaluation.results import EvaluationError, paused_gc

STAT_NAMES = {
    "keypoints": ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"],
    "bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
}
PREFIX = {"keypoints": "kp", "bbox": "bbox"}
# Every key of an evaluation's metrics dict: kp/AP, kp/AP50, ..., bbox/AR100, ...
METRIC_NAMES = tuple(f"{PREFIX[kind]}/{name}" for kind, names in STAT_NAMES.items() for name in names)
KEYPOINT_AREAS = ("keypoints", "box")


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
    num_thresholds: int  # of IoU (OKS) thresholds: the rows of each record's match arrays


def _joined(sequences: tuple[Any, ...], dtype: type) -> np.ndarray:
    """One flat array of many short arrays or lists."""
    if sequences and isinstance(sequences[0], np.ndarray):
        return np.concatenate(sequences).astype(dtype, copy=False)
    return np.fromiter(itertools.chain.from_iterable(sequences), dtype)


@dataclass
class MatchColumns:
    """ImageMatches as arrays: what accumulate() reads of each record, one flat array per field.

    Records keep their [category][area range][image] order; `present` says which exist (pycocotools
    has None for an image with neither ground truth nor detections). The i-th present record owns
    dt_counts[i] consecutive dt_scores, num_thresholds x dt_counts[i] consecutive dt_matched and
    dt_ignored ([threshold][detection]) and gt_counts[i] consecutive gt_ignored. It pickles as a
    few buffers, however many records it holds.
    """

    image_ids: np.ndarray  # int64
    cat_ids: np.ndarray  # int64
    num_detections: int
    num_thresholds: int
    present: np.ndarray  # bool, one per record
    dt_counts: np.ndarray  # int64, one per present record
    gt_counts: np.ndarray  # int64, one per present record
    dt_scores: np.ndarray  # float64
    dt_matched: np.ndarray  # bool: matched to a ground truth at that IoU/OKS threshold
    dt_ignored: np.ndarray  # bool
    gt_ignored: np.ndarray  # bool


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

    def record_fields(self, record: Any) -> tuple[Any, Any, Any, Any]:
        """A present record's dt_scores, dt matches, dt_ignored, gt_ignored: flat lists or arrays, in
        MatchColumns' layout (a match is nonzero where matched)."""
        raise NotImplementedError

    def record(self, dt_scores: np.ndarray, dt_matched: np.ndarray, dt_ignored: np.ndarray,
               gt_ignored: np.ndarray) -> Any:
        """A record of the library's own type holding what accumulate() reads of it (matches [threshold][detection])."""
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
                            list(records), len(dt.getAnnIds()), len(evaluator.params.iouThrs))

    def columns(self, matches: ImageMatches) -> MatchColumns:
        """The records of `matches` as arrays, to send to rank 0."""
        with paused_gc():  # many lists at once: the cyclic collector would walk them over and over
            present = np.fromiter((r is not None for r in matches.records), bool, len(matches.records))
            fields = [self.record_fields(r) for r in matches.records if r is not None]
            scores, matched, ignored, gt_ignored = zip(*fields) if fields else ((), (), (), ())
            return MatchColumns(
                image_ids=np.asarray(matches.image_ids, np.int64), cat_ids=np.asarray(matches.cat_ids, np.int64),
                num_detections=matches.num_detections, num_thresholds=matches.num_thresholds, present=present,
                dt_counts=np.fromiter(map(len, scores), np.int64, len(fields)),
                gt_counts=np.fromiter(map(len, gt_ignored), np.int64, len(fields)),
                dt_scores=_joined(scores, np.float64), dt_matched=_joined(matched, bool),
                dt_ignored=_joined(ignored, bool), gt_ignored=_joined(gt_ignored, bool),
            )

    def from_columns(self, columns: MatchColumns) -> ImageMatches:
        """The library's records again (rank 0, once per record): what merge() takes."""
        t = columns.num_thresholds
        dt_ends, gt_ends = np.cumsum(columns.dt_counts).tolist(), np.cumsum(columns.gt_counts).tolist()
        records: list[Any] = [None] * len(columns.present)
        dt_start = gt_start = 0
        with paused_gc():
            for position, dt_end, gt_end in zip(np.flatnonzero(columns.present).tolist(), dt_ends, gt_ends):
                records[position] = self.record(
                    columns.dt_scores[dt_start:dt_end],
                    columns.dt_matched[t * dt_start:t * dt_end].reshape(t, dt_end - dt_start),
                    columns.dt_ignored[t * dt_start:t * dt_end].reshape(t, dt_end - dt_start),
                    columns.gt_ignored[gt_start:gt_end])
                dt_start, gt_start = dt_end, gt_end
        return ImageMatches(columns.image_ids.tolist(), columns.cat_ids.tolist(), records, columns.num_detections, t)

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
        grids = [np.asarray(part.records, dtype=object).reshape(len(p.catIds), len(p.areaRng), len(part.image_ids))
                 for part in parts]
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

    def record_fields(self, record: Any) -> tuple[Any, Any, Any, Any]:
        # accumulate() reads a match only as matched or not (dtMatches holds the ground truth's id, 0 for none)
        return record["dtScores"], record["dtMatches"].ravel(), record["dtIgnore"].ravel(), record["gtIgnore"]

    def record(self, dt_scores: np.ndarray, dt_matched: np.ndarray, dt_ignored: np.ndarray,
               gt_ignored: np.ndarray) -> Any:
        return {"dtScores": dt_scores, "dtMatches": dt_matched, "dtIgnore": dt_ignored, "gtIgnore": gt_ignored}


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

    def record_fields(self, record: Any) -> tuple[Any, Any, Any, Any]:
        # The pickle state: detection matches (ground truth ids, 0 for none), ground truth matches, scores,
        # ground truth ignores, detection ignores, matched pairs; accumulate() reads neither the ground
        # truth matches nor the matched pairs (those feed only faster_coco_eval's extra_calc statistics).
        dt_matches, _, scores, gt_ignored, dt_ignored, _ = record.__getstate__()
        return scores, dt_matches, dt_ignored, gt_ignored

    def record(self, dt_scores: np.ndarray, dt_matched: np.ndarray, dt_ignored: np.ndarray,
               gt_ignored: np.ndarray) -> Any:
        from faster_coco_eval.faster_eval_api_cpp import ImageEvaluation

        record = ImageEvaluation.__new__(ImageEvaluation)  # as pickle builds one
        record.__setstate__((dt_matched.ravel().tolist(), [], dt_scores.tolist(), gt_ignored.tolist(),
                             dt_ignored.ravel().tolist(), []))
        return record


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
