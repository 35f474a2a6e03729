"""Keypoint stats by the COCO keypoint protocol: a detection's area is its keypoints' extent.

The set is built so that the box's area and the keypoints' extent put the unmatched detections
in different area ranges (box: large, keypoints: medium); kp/APm and kp/APl then depend on which
area is used, and dist_kp must give what pycocotools gives on keypoint-only records.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dist_kp.data.index import load_index
from dist_kp.storage import Storage
from dist_kp.data.synthetic import COCO_KEYPOINT_NAMES, COCO_SKELETON
from dist_kp.evaluation.backends import STAT_NAMES, metrics_dict
from dist_kp.evaluation.results import ground_truth
from dist_kp.evaluation.results_file import evaluate_results
from tests.conftest import check, run_module
from tests.test_evaluation import assert_close, pycocotools_direct, sharded


def person(rng: np.random.Generator, x: float, y: float, size: float) -> np.ndarray:
    """17 visible keypoints spread over a size x size square at (x, y)."""
    return np.stack([x + rng.uniform(0, size, 17), y + rng.uniform(0, size, 17), np.full(17, 2.0)], 1)


def area_ranges_set(seed: int = 0) -> tuple[dict, list[dict]]:
    """Medium and large persons; detections whose boxes are larger than their keypoints' extent."""
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    for image_id in range(1, 13):
        images.append({"id": image_id, "width": 400, "height": 400, "file_name": f"{image_id}.jpg"})
        for x, y, size in ((20, 20, 75.0), (180, 180, 160.0)):  # extent areas ~5,000 (medium), ~24,000 (large)
            kps = person(rng, x, y, size).round(2)
            x0, y0 = kps[:, :2].min(0)
            w, h = kps[:, :2].max(0) - kps[:, :2].min(0)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                "bbox": [x0, y0, w, h], "area": round(float(w * h), 2), "num_keypoints": 17,
                                "keypoints": kps.reshape(-1).tolist()})
            noisy = kps.copy()
            noisy[:, :2] += rng.normal(0, rng.uniform(0.5, 4.0), (17, 2))
            noisy[:, 2] = 1
            pad = 0.25 * size  # a box around a person is larger than its keypoints' extent: 75 -> 112 px
            box = [x0 - pad / 2, y0 - pad / 2, w + pad, h + pad]
            results.append({"image_id": image_id, "category_id": 1, "score": round(float(rng.uniform(0.2, 1)), 4),
                            "bbox": np.round(box, 2).tolist(), "keypoints": noisy.round(2).reshape(-1).tolist()})
        # A false positive away from everyone: keypoint extent ~6,400 (medium), box ~10,000 (large).
        fake = person(rng, 250, 20, 80.0)
        fake[:, 2] = 1
        results.append({"image_id": image_id, "category_id": 1, "score": round(float(rng.uniform(0.3, 1)), 4),
                        "bbox": [240.0, 10.0, 100.0, 100.0], "keypoints": fake.round(2).reshape(-1).tolist()})
    categories = [{"id": 1, "name": "person", "keypoints": COCO_KEYPOINT_NAMES, "skeleton": COCO_SKELETON}]
    return {"images": images, "annotations": annotations, "categories": categories}, results


@pytest.fixture(scope="module")
def area_set(tmp_path_factory: pytest.TempPathFactory):
    gt, results = area_ranges_set()
    path = tmp_path_factory.mktemp("area_set") / "person_keypoints_val2017.json"
    path.write_text(json.dumps(gt))
    return path, load_index(str(path), Storage()), results


def keypoint_stats(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("kp/")}


def test_the_set_puts_box_area_and_keypoint_area_in_different_ranges(area_set) -> None:
    path, _, results = area_set
    by_keypoints = pycocotools_direct(path, results, "keypoints")
    by_box = pycocotools_direct(path, results, "keypoints", keypoint_area="box")
    assert by_keypoints[3] < by_box[3] and by_keypoints[4] > by_box[4]  # kp/APm, kp/APl
    assert by_keypoints[:3] == by_box[:3]  # AP, AP50, AP75 do not depend on the areas


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_keypoint_stats_equal_pycocotools_on_keypoint_only_records(area_set, backend: str, world_size: int) -> None:
    path, index, results = area_set
    metrics = sharded(backend, index, results, world_size)
    direct = metrics_dict({t: pycocotools_direct(path, results, t) for t in STAT_NAMES})
    assert 0.2 < metrics["kp/APm"] < 0.99 and 0.2 < metrics["kp/APl"] < 0.99
    if backend == "pycocotools":
        assert keypoint_stats(metrics) == keypoint_stats(direct)  # bit for bit
    else:
        assert keypoint_stats(metrics) == keypoint_stats(sharded(backend, index, results, 1))
        assert_close(keypoint_stats(metrics), keypoint_stats(direct))
    assert_close(metrics, direct)  # the box stats keep using the boxes


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_keypoint_area_box_gives_the_box_convention(area_set, backend: str) -> None:
    path, index, results = area_set
    metrics = evaluate_results(ground_truth(index), results, backend, None, keypoint_area="box").metrics
    by_box = metrics_dict({"keypoints": pycocotools_direct(path, results, "keypoints", keypoint_area="box")})
    assert_close(keypoint_stats(metrics), by_box)
    assert keypoint_stats(sharded(backend, index, results, 2, keypoint_area="box")) == keypoint_stats(metrics)


def test_results_file_cli_uses_the_keypoint_extent_unless_told_box(area_set, tmp_path: Path) -> None:
    path, _, results = area_set
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(results))
    written = {}
    for area in ("keypoints", "box"):
        check(run_module("dist_kp.evaluate", ["--annotations", str(path), "--results", str(results_path), "--backend",
                                              "pycocotools", "--keypoint-area", area, "--out", str(tmp_path / area)]))
        written[area] = json.loads((tmp_path / area / "metrics.json").read_text())
    expected = {"keypoints": pycocotools_direct(path, results, "keypoints"),
                "box": pycocotools_direct(path, results, "keypoints", keypoint_area="box")}
    for area in ("keypoints", "box"):
        assert keypoint_stats(written[area]) == metrics_dict({"keypoints": expected[area]})
