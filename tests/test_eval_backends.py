"""One class per evaluation backend, and the library internals dist_kp still relies on.

The merge feeds per-image records of several evaluate() calls to one accumulate(). That rests
on internals no public API promises: the layout of the per-image records ([category][area
range][image]), pycocotools' `evalImgs` and `_paramsEval`, faster_coco_eval's `separate_eval`
and `_evalImgs_cpp`, its records' pickle state, and that accumulate() reads of a record only its
scores, matched-or-not, ignore flags and ground truth ignore flags (rank 0 rebuilds records with
only these from the arrays other ranks send). These tests fail when an upgrade of either library breaks one of them
(pyproject pins the versions below the next minor release for that reason).
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from dist_kp.data.index import load_index
from dist_kp.storage import Storage
from dist_kp.evaluation.backends import BACKENDS, STAT_NAMES, EvalBackend, backend_for, detection_sets
from dist_kp.evaluation.results import EvaluationError, check_sigmas, ground_truth
from tests.test_evaluation import noisy_predictions, val_json


@pytest.fixture(scope="module")
def dataset(synthetic_root: Path):
    index = load_index(str(val_json(synthetic_root)), Storage())
    results = noisy_predictions(json.loads(val_json(synthetic_root).read_text()), seed=3)
    # Scores tied across images: accumulate's stable sort then depends on the image order of the records.
    return index, [dict(r, score=round(r["score"], 1)) for r in results]


def test_every_backend_name_gives_its_own_class() -> None:
    assert set(BACKENDS) == {"pycocotools", "faster_coco_eval"}
    classes = {type(backend_for(name)) for name in BACKENDS}
    assert len(classes) == len(BACKENDS) and all(issubclass(c, EvalBackend) for c in classes)
    assert all(backend_for(name).name == name for name in BACKENDS)
    with pytest.raises(EvaluationError, match="unknown evaluation backend 'detectron'; choose one of"):
        backend_for("detectron")


def library_run_in_one_go(backend: EvalBackend, gt, dt, iou_type: str, sigmas: np.ndarray) -> list[float]:
    """The library's own public pipeline on all images: evaluate, accumulate, summarize."""
    coco_eval = backend.classes()[1]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = coco_eval(gt, dt, iou_type)
        if iou_type == "keypoints":
            evaluator.params.kpt_oks_sigmas = sigmas
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(s) for s in evaluator.stats]


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_internals_relied_upon_still_hold(dataset, name: str) -> None:
    index, results = dataset
    backend = backend_for(name)
    sigmas = check_sigmas(None, index.meta.num_keypoints)
    gt = backend.coco(ground_truth(index))
    dts = detection_sets(backend, gt, results, tuple(STAT_NAMES))
    image_ids = sorted(gt.getImgIds())
    for iou_type in STAT_NAMES:
        whole = backend.match(gt, dts[iou_type], iou_type, sigmas, image_ids)
        num_areas = 3 if iou_type == "keypoints" else 4  # all, (small,) medium, large
        assert len(whole.records) == len(whole.cat_ids) * num_areas * len(image_ids)  # [category][area][image]
        if name == "pycocotools":  # readable records: check the image axis directly
            for a in range(num_areas):
                ids = [r["image_id"] if r else i for r, i in zip(whole.records[a * len(image_ids):], image_ids)]
                assert ids == image_ids
        # Shards whose images interleave: any other record layout mixes images, areas or categories.
        parts = []
        for rank in range(3):
            positions = np.arange(rank, len(index), 3)
            local = backend.coco(ground_truth(index, positions))
            local_ids = [int(i) for i in index.image_ids[positions]]
            local_results = [r for r in results if r["image_id"] in set(local_ids)]
            local_dt = detection_sets(backend, local, local_results, (iou_type,))[iou_type]
            parts.append(backend.match(local, local_dt, iou_type, sigmas, local_ids))
        merged = backend.merge(iou_type, parts[::-1])
        assert merged == backend.merge(iou_type, [whole])
        rebuilt = [backend.from_columns(pickle.loads(pickle.dumps(backend.columns(part)))) for part in parts]
        assert backend.merge(iou_type, rebuilt) == merged  # bit for bit
        assert merged == library_run_in_one_go(backend, gt, dts[iou_type], iou_type, sigmas)
        assert 0.05 < merged[0] < 0.99
