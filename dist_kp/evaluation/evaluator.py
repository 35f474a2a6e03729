"""The evaluation of a run: per-rank matching of each rank's shard, one merge on rank 0, the files it writes."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from dist_kp import distributed
from dist_kp.config import Config
from dist_kp.data.index import KeypointIndex
from dist_kp.data.loaders import build_eval_loader
from dist_kp.evaluation.backends import (
    STAT_NAMES,
    EvalBackend,
    ImageMatches,
    MatchColumns,
    backend_for,
    detection_sets,
    metrics_dict,
    summary_text,
)
from dist_kp.evaluation.inference import predict
from dist_kp.evaluation.results import ResultColumns, check_sigmas, ground_truth
from dist_kp.evaluation.results_file import EvalOutput
from dist_kp.model.keypoint_rcnn import unwrap
from dist_kp.storage.run_folder import EVAL_METRICS, EVAL_RESULTS, RunFolder

log = logging.getLogger(__name__)


def evaluate_distributed(
    index: KeypointIndex, local_positions: np.ndarray, local_results: list[dict[str, Any]], backend: str,
    sigmas: list[float] | None, keypoint_area: str = "keypoints",
) -> EvalOutput:
    """Match this rank's images, merge on rank 0, and give every rank the metrics.

    Rank 0 keeps its own records; every other rank sends its per-image match records and its result
    records as arrays (MatchColumns, ResultColumns), which rank 0 turns back into records once.
    """
    oks_sigmas = check_sigmas(sigmas, index.meta.num_keypoints)
    library = backend_for(backend)
    parts = rank_matches(library, index, local_positions, local_results, oks_sigmas, keypoint_area)
    sent = None if distributed.is_main_process() else rank_payload(library, parts, local_results)
    gathered = distributed.gather_objects(sent)
    output = merge_ranks(library, parts, local_results, gathered[1:]) if gathered is not None else None
    metrics = distributed.broadcast_object(output.metrics if output else None)
    return output or EvalOutput(metrics, None, "")


def rank_matches(library: EvalBackend, index: KeypointIndex, positions: np.ndarray, results: list[dict[str, Any]],
                 oks_sigmas: np.ndarray, keypoint_area: str = "keypoints") -> dict[str, ImageMatches]:
    """One rank's per-image matching of its images (positions in the index) against its results, per iou type."""
    gt = library.coco(ground_truth(index, positions))
    dts = detection_sets(library, gt, results, tuple(STAT_NAMES), keypoint_area)
    image_ids = [int(index.image_ids[i]) for i in positions.tolist()]
    return {t: library.match(gt, dts[t], t, oks_sigmas, image_ids) for t in STAT_NAMES}


def rank_payload(library: EvalBackend, parts: dict[str, ImageMatches], results: list[dict[str, Any]]
                 ) -> tuple[dict[str, MatchColumns], ResultColumns]:
    """What a rank other than 0 sends: its match records and result records as arrays."""
    return {t: library.columns(p) for t, p in parts.items()}, ResultColumns.from_records(results)


def merge_ranks(library: EvalBackend, own_parts: dict[str, ImageMatches], own_results: list[dict[str, Any]],
                sent: list[tuple[dict[str, MatchColumns], ResultColumns]]) -> EvalOutput:
    """Rank 0's merge of its own records and what the other ranks sent (in rank order)."""
    ranks_parts = [own_parts] + [{t: library.from_columns(c) for t, c in columns.items()} for columns, _ in sent]
    results = own_results + [r for _, result_columns in sent for r in result_columns.records()]
    stats = {t: library.merge(t, [rank_parts[t] for rank_parts in ranks_parts]) for t in STAT_NAMES}
    return EvalOutput(metrics_dict(stats), results, "\n".join(summary_text(t, v) for t, v in stats.items()))


def write_outputs(folder: RunFolder, step: int, output: EvalOutput, ema: bool = False) -> str:
    """results.json and metrics.json under OUTPUT_DIR/eval/<step>/ (rank 0); returns the folder URL.

    ema: the EMA of the weights was evaluated (train.ema); metrics.json then says "weights": "ema".
    """
    folder.write(folder.eval_file(step, EVAL_RESULTS), json.dumps(output.results or []).encode())
    written = {"step": step, **({"weights": "ema"} if ema else {}), **output.metrics}
    folder.write(folder.eval_file(step, EVAL_METRICS), json.dumps(written, indent=1).encode())
    return folder.eval_folder(step)


class Evaluator:
    """The evaluation of a run's validation set, built once (detectron2's DatasetEvaluator shape):

        evaluator = Evaluator(cfg, index, folder, device)  # this rank's shard and loader, backend checked
        evaluator.process(model)                           # inference on this rank's shard
        output = evaluator.evaluate(step)                  # collective: merge on rank 0, files, metrics everywhere

    Rank 0 logs both summaries and writes results.json and metrics.json under
    OUTPUT_DIR/eval/<step>/; every rank gets the metrics dict.
    """

    def __init__(self, cfg: Config, index: KeypointIndex, folder: RunFolder, device: torch.device) -> None:
        check_sigmas(cfg.eval.sigmas, index.meta.num_keypoints)  # a wrong eval.sigmas fails at start
        backend_for(cfg.eval.backend)
        self.cfg = cfg.eval
        self.precision = cfg.train.precision
        self.index = index
        self.folder = folder
        self.device = device
        self.loader = build_eval_loader(cfg, index, distributed.get_rank(), distributed.get_world_size(), device,
                                        folder.storage)
        self.positions = np.asarray(self.loader.dataset.indices, np.int64)
        self.results: list[dict[str, Any]] = []

    def process(self, model: nn.Module) -> None:
        """Inference on this rank's images; their result records wait for `evaluate`."""
        self.results = predict(unwrap(model), self.loader, self.device, self.index.meta.category_id, self.precision)

    def evaluate(self, step: int, ema: bool = False) -> EvalOutput:
        """The merged COCO evaluation of what `process` found (a collective); rank 0 writes and logs it.

        ema: the model processed was the EMA of the weights (train.ema); the log and metrics.json say so.
        """
        output = evaluate_distributed(self.index, self.positions, self.results, self.cfg.backend, self.cfg.sigmas,
                                      self.cfg.keypoint_area)
        self.results = []
        if distributed.is_main_process():
            written = write_outputs(self.folder, step, output, ema)
            log.info("evaluation at step %d (%s%d images, %d detections, %s):\n%s\nwritten to %s", step,
                     "EMA weights, " if ema else "",
                     len(self.index) if self.cfg.max_images is None else min(self.cfg.max_images, len(self.index)),
                     len(output.results or []), self.cfg.backend, output.summary, written)
        return output

    def run(self, model: nn.Module, step: int, ema: bool = False) -> EvalOutput:
        """`process` then `evaluate`: what the training's evaluation hook calls (ema: `model` is the EMA)."""
        self.process(model)
        return self.evaluate(step, ema)
