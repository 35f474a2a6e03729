"""The evaluation of one complete results list in one process: `evaluate --results`, and EvalOutput.

No torch here nor in what this imports (json, numpy, the COCO backend): a results file is
evaluated without paying for torch's import (seconds and a GB of memory before any work).
tests/test_eval_results_file.py checks that the command never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dist_kp.config import COCO_KEYPOINT_SIGMAS
from dist_kp.evaluation.backends import backend_for, detection_sets, metrics_dict, summary_text
from dist_kp.evaluation.results import check_sigmas


@dataclass
class EvalOutput:
    """What an evaluation returns on every rank; `results` (all ranks' records) only on rank 0."""

    metrics: dict[str, float]
    results: list[dict[str, Any]] | None
    summary: str


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
