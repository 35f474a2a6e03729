"""Distributed COCO evaluation: exact, whatever the world size and backend.

"Exact" (see dist_kp.evaluation): 1, 2, 3 processes give bit-identical stats; the pycocotools
backend gives bit for bit what pycocotools run directly gives; faster_coco_eval accumulates in
another order and agrees with pycocotools within TOLERANCE (1e-12 absolute). One changed match
moves a stat by at least ~1e-6 on these sets (test_one_changed_match_moves_the_stats_far_past_the_tolerance),
so the tolerance still catches every real difference in matching.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

from dist_kp.config import ConfigError, load_config
from dist_kp.data.index import index_from_coco, load_index
from dist_kp.storage import Storage
from dist_kp.evaluation.backends import STAT_NAMES, backend_for, detection_sets, metrics_dict
from dist_kp.evaluation.evaluator import merge_ranks, rank_matches, rank_payload
from dist_kp.evaluation.results import EvaluationError, check_sigmas, ground_truth
from dist_kp.evaluation.results_file import EvalOutput, evaluate_results
from tests.conftest import TINY_CONFIG, check, run_module, tiny_overrides


def val_json(root: Path) -> Path:
    return root / "annotations" / "person_keypoints_val2017.json"


def noisy_predictions(gt: dict, seed: int = 0) -> list[dict]:
    """Ground truth moved by noise, with random scores and some false positives: AP strictly in (0, 1)."""
    rng = np.random.default_rng(seed)
    results = []
    for ann in gt["annotations"]:
        if ann["iscrowd"]:
            continue
        kps = np.asarray(ann["keypoints"], float).reshape(-1, 3)
        kps[:, :2] += rng.normal(0, rng.uniform(0.5, 6.0), size=(len(kps), 2))
        kps[:, 2] = 1
        x, y, w, h = ann["bbox"]
        box = [x + rng.normal(0, 3), y + rng.normal(0, 3), w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
        results.append({"image_id": ann["image_id"], "category_id": 1, "keypoints": kps.reshape(-1).round(2).tolist(),
                        "bbox": [round(v, 2) for v in box], "score": round(float(rng.uniform(0.1, 1.0)), 4)})
        if rng.random() < 0.3:
            fake = dict(results[-1], score=round(float(rng.uniform(0.0, 0.5)), 4))
            fake["keypoints"] = (np.asarray(fake["keypoints"]) + 20).round(2).tolist()
            results.append(fake)
    return results


TOLERANCE = 1e-12  # faster_coco_eval against pycocotools: last-bit differences of another summation order


def assert_close(got: dict[str, float], expected: dict[str, float], tolerance: float = TOLERANCE) -> None:
    """Same keys, every value within `tolerance` (absolute); names the stats that differ."""
    assert got.keys() == expected.keys()
    far = {k: (got[k], expected[k]) for k in got if not abs(got[k] - expected[k]) <= tolerance}
    assert not far, f"stats differ by more than {tolerance}: {far}"


def pycocotools_direct(annotations: Path, results: list[dict], iou_type: str,
                       keypoint_area: str = "keypoints") -> list[float]:
    """pycocotools on its own, on the records as the COCO results format of `iou_type` has them.

    COCO keypoint results carry no box (loadRes then takes each area from the keypoints' extent);
    keypoint_area="box" keeps the boxes (loadRes then takes each area from the box).
    """
    if iou_type == "keypoints" and keypoint_area == "keypoints":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(s) for s in evaluator.stats]


def rank_shards(index, world_size: int) -> list[np.ndarray]:
    """Each rank's positions in the index, as the eval loader shards them (indices[rank::world])."""
    return [np.arange(rank, len(index), world_size) for rank in range(world_size)]


def sharded_output(backend: str, index, results: list[dict], shards: list[np.ndarray],
                   keypoint_area: str = "keypoints") -> EvalOutput:
    """What ranks with these shards compute, as evaluate_distributed does: per-shard matching; ranks
    other than 0 send their records as arrays, through pickle as gather_object does; one merge on rank 0."""
    sigmas = check_sigmas(None, index.meta.num_keypoints)
    library = backend_for(backend)
    ranks = []
    for positions in shards:
        ids = set(index.image_ids[positions].tolist())
        local = [r for r in results if r["image_id"] in ids]
        ranks.append((rank_matches(library, index, positions, local, sigmas, keypoint_area), local))
    sent = [pickle.loads(pickle.dumps(rank_payload(library, parts, local))) for parts, local in ranks[1:]]
    return merge_ranks(library, *ranks[0], sent)


def sharded(backend: str, index, results: list[dict], world_size: int,
            keypoint_area: str = "keypoints") -> dict[str, float]:
    """The metrics of `world_size` ranks (see sharded_output)."""
    return sharded_output(backend, index, results, rank_shards(index, world_size), keypoint_area).metrics


@pytest.fixture(scope="module")
def noisy(synthetic_root: Path):
    gt = json.loads(val_json(synthetic_root).read_text())
    return load_index(str(val_json(synthetic_root)), Storage()), noisy_predictions(gt)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharded_merge_equals_pycocotools_run_directly(noisy, synthetic_root: Path, backend: str,
                                                       world_size: int) -> None:
    index, results = noisy
    metrics = sharded(backend, index, results, world_size)
    direct = metrics_dict({t: pycocotools_direct(val_json(synthetic_root), results, t) for t in STAT_NAMES})
    assert 0.1 < metrics["kp/AP"] < 0.99 and 0.1 < metrics["bbox/AP"] < 0.99
    if backend == "pycocotools":
        assert metrics == direct  # bit for bit
    else:
        assert metrics == sharded(backend, index, results, 1)  # bit for bit, whatever the world size
        assert_close(metrics, direct)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_uneven_shards_and_an_empty_rank_give_the_stats_and_records_of_one_process(noisy, backend: str) -> None:
    index, results = noisy
    one = sharded_output(backend, index, results, rank_shards(index, 1))
    order = np.random.default_rng(0).permutation(len(index))  # shards need not be contiguous nor sorted
    shards = [np.sort(order[: len(index) * 3 // 5]), np.zeros(0, np.int64), np.sort(order[len(index) * 3 // 5:])]
    uneven = sharded_output(backend, index, results, shards)
    assert uneven.metrics == one.metrics  # bit for bit
    assert 0.1 < one.metrics["kp/AP"] < 0.99
    per_rank = [[r for r in results if r["image_id"] in set(index.image_ids[s].tolist())] for s in shards]
    assert uneven.results == [r for rank_results in per_rank for r in rank_results]  # rank order, records equal


def test_a_rank_sends_its_records_as_arrays_not_python_objects(noisy) -> None:
    index, results = noisy
    sigmas = check_sigmas(None, index.meta.num_keypoints)

    def sent(library, positions: np.ndarray) -> tuple[int, list]:
        local = [r for r in results if r["image_id"] in set(index.image_ids[positions].tolist())]
        payload = rank_payload(library, rank_matches(library, index, positions, local, sigmas), local)
        columns, result_columns = payload
        fields = [*(v for c in columns.values() for v in vars(c).values()), *vars(result_columns).values()]
        return sum(1 for _ in pickletools.genops(pickle.dumps(payload))), fields

    for backend in ("pycocotools", "faster_coco_eval"):
        library = backend_for(backend)
        small, fields = sent(library, np.arange(0, len(index), 4))
        large, _ = sent(library, np.arange(len(index)))
        assert all(isinstance(v, int) or (isinstance(v, np.ndarray) and v.dtype.kind in "bif") for v in fields)
        # The pickle has as many parts for 4x the images, records and results: none per record or value.
        assert large == small, (backend, small, large)


def test_backends_agree_within_1e_12(noisy) -> None:
    index, results = noisy
    gt = ground_truth(index)
    a = evaluate_results(gt, results, "pycocotools", None).metrics
    b = evaluate_results(gt, results, "faster_coco_eval", None).metrics
    assert_close(b, a)
    assert len(a) == 22


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_one_changed_match_moves_the_stats_far_past_the_tolerance(noisy, backend: str) -> None:
    index, results = noisy
    gt = ground_truth(index)
    best = max(range(len(results)), key=lambda i: results[i]["score"])
    moved = [dict(r) for r in results]  # the top-scored detection (a match) moved off its person
    moved[best]["keypoints"] = [v + 50 if k % 3 < 2 else v for k, v in enumerate(moved[best]["keypoints"])]
    moved[best]["bbox"] = [v + 50 if k < 2 else v for k, v in enumerate(moved[best]["bbox"])]
    a = evaluate_results(gt, results, backend, None).metrics
    b = evaluate_results(gt, moved, backend, None).metrics
    assert abs(a["kp/AP"] - b["kp/AP"]) > 1e6 * TOLERANCE and abs(a["bbox/AP"] - b["bbox/AP"]) > 1e6 * TOLERANCE


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_ground_truth_as_predictions_scores_ap_one(synthetic_root: Path, backend: str) -> None:
    gt = json.loads(val_json(synthetic_root).read_text())
    perfect = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "bbox": a["bbox"],
                "score": 1.0} for a in gt["annotations"] if not a["iscrowd"] and a["num_keypoints"] > 0]
    index = load_index(str(val_json(synthetic_root)), Storage())
    metrics = evaluate_results(ground_truth(index), perfect, backend, None).metrics
    assert metrics["kp/AP"] == pytest.approx(1.0) and metrics["bbox/AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_no_predictions_give_zeros_without_error(synthetic_root: Path, backend: str) -> None:
    index = load_index(str(val_json(synthetic_root)), Storage())
    metrics = evaluate_results(ground_truth(index), [], backend, None).metrics
    assert set(metrics.values()) == {0.0} and "kp/AR" in metrics and "bbox/AR100" in metrics


def five_keypoint_dataset() -> dict:
    names = ["head", "left_hand", "right_hand", "left_foot", "right_foot"]
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in range(1, 4)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [10.0, 10.0, 50.0, 60.0], "area": 3000.0,
             "iscrowd": 0, "num_keypoints": 5,
             "keypoints": [20, 15, 2, 12, 40, 2, 55, 40, 2, 20, 68, 2, 50, 68, 2]} for i in range(1, 4)]
    return {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "person", "keypoints": names, "skeleton": [[1, 2], [1, 3]]}]}


def test_custom_five_keypoint_skeleton_evaluates_with_five_sigmas() -> None:
    data = five_keypoint_dataset()
    results = [{"image_id": a["image_id"], "category_id": 1, "score": 0.9, "bbox": a["bbox"],
                "keypoints": [v + (1 if k % 3 < 2 else 0) for k, v in enumerate(a["keypoints"])]}
               for a in data["annotations"]]
    gt = ground_truth(index_from_coco(data, "five.json"))
    metrics = evaluate_results(gt, results, "faster_coco_eval", [0.05, 0.06, 0.06, 0.08, 0.08]).metrics
    assert metrics["kp/AP"] > 0.5


def test_sigmas_that_do_not_match_the_keypoints_are_refused() -> None:
    gt = ground_truth(index_from_coco(five_keypoint_dataset(), "five.json"))
    with pytest.raises(EvaluationError, match="4 OKS sigmas but the dataset has 5 keypoints"):
        evaluate_results(gt, [], "pycocotools", [0.05, 0.06, 0.06, 0.08])
    with pytest.raises(EvaluationError, match="COCO's default has 17 OKS sigmas but the dataset has 5"):
        evaluate_results(gt, [], "pycocotools", None)


# COCO's sigmas as the COCO paper, mmpose and pycocotools' params.kpt_oks_sigmas give them ...
COCO_TRUE_SIGMAS = [0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107,
                    0.087, 0.087, 0.089, 0.089]
# ... and as pycocotools' source writes them (x10, divided by 10 in its Params).
COCO_SOURCE_FORM = [.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]


def test_the_default_sigmas_are_pycocotools_own_to_the_last_bit() -> None:
    assert np.array_equal(check_sigmas(None, 17), Params(iouType="keypoints").kpt_oks_sigmas)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_coco_sigmas_given_as_true_sigmas_give_the_stats_of_the_default(synthetic_root: Path, backend: str) -> None:
    gt = ground_truth(load_index(str(val_json(synthetic_root)), Storage()))
    results = noisy_predictions(gt)
    default = evaluate_results(gt, results, backend, None).metrics
    typed = evaluate_results(gt, results, backend, COCO_TRUE_SIGMAS).metrics
    assert 0.2 < default["kp/AP"] < 1
    assert typed == default


def test_sigmas_ten_times_too_large_are_refused_naming_the_convention(synthetic_root: Path) -> None:
    gt = ground_truth(load_index(str(val_json(synthetic_root)), Storage()))
    results = noisy_predictions(gt)
    convention = "OKS sigmas are the true sigma of each keypoint, e.g. COCO nose 0.026"
    mistake = "values look 10x too large (pycocotools' source form .26 = 0.026): divide them by 10"
    with pytest.raises(EvaluationError) as refused:  # evaluate --results ... --sigmas .26 ...
        evaluate_results(gt, results, "pycocotools", COCO_SOURCE_FORM)
    assert convention in str(refused.value) and mistake in str(refused.value)
    with pytest.raises(ConfigError) as refused_config:  # eval.sigmas in a config (also evaluate --config --sigmas)
        load_config(TINY_CONFIG, [f"eval.sigmas={COCO_SOURCE_FORM}"])
    assert "eval.sigmas: Value error, " + convention in str(refused_config.value)
    assert mistake in str(refused_config.value)
    with pytest.raises(ConfigError, match="each must be positive"):
        load_config(TINY_CONFIG, ["eval.sigmas=[0.026, 0.0]"])
    assert load_config(TINY_CONFIG, [f"eval.sigmas={COCO_TRUE_SIGMAS}"]).eval.sigmas == COCO_TRUE_SIGMAS


def test_same_weights_give_identical_metrics_on_1_2_and_3_processes(
    tiny_model_final: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    runs = {"faster_1": (1, "faster_coco_eval"), "faster_2": (2, "faster_coco_eval"),
            "faster_3": (3, "faster_coco_eval"), "pycocotools_2": (2, "pycocotools")}
    metrics, results = {}, {}
    for name, (nproc, backend) in runs.items():
        out = tmp_path / name
        check(run_module("dist_kp.evaluate", ["--config", str(TINY_CONFIG), "--weights", str(tiny_model_final),
                                              f"data.root={synthetic_root}", f"output_dir={out}", "train.workers=0",
                                              f"eval.backend={backend}"], nproc=nproc))
        metrics[name] = json.loads((out / "eval/00000000/metrics.json").read_text())
        results[name] = json.loads((out / "eval/00000000/results.json").read_text())
    assert metrics["faster_1"] == metrics["faster_2"] == metrics["faster_3"]  # bit for bit
    assert metrics["faster_1"]["bbox/AR100"] > 0  # a real, non-trivial evaluation
    as_set = {n: sorted(json.dumps(r, sort_keys=True) for r in results[n]) for n in results}
    assert as_set["faster_1"] == as_set["faster_2"] == as_set["faster_3"] == as_set["pycocotools_2"]
    direct = metrics_dict({t: pycocotools_direct(val_json(synthetic_root), results["faster_2"], t) for t in STAT_NAMES})
    assert {k: v for k, v in metrics["pycocotools_2"].items() if k != "step"} == direct  # bit for bit
    assert_close({k: v for k, v in metrics["faster_2"].items() if k != "step"}, direct)


def test_results_file_cli_prints_both_summaries_and_writes_metrics(synthetic_root: Path, tmp_path: Path) -> None:
    gt = json.loads(val_json(synthetic_root).read_text())
    results_path = tmp_path / "preds.json"
    results_path.write_text(json.dumps(noisy_predictions(gt, seed=1)))
    result = check(run_module("dist_kp.evaluate", ["--annotations", str(val_json(synthetic_root)),
                                                   "--results", str(results_path), "--backend", "pycocotools"]))
    assert "keypoints (OKS)" in result.stderr and "bbox (IoU)" in result.stderr
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["kp/AP"] > 0 and "bbox/AP" in written
    no_boxes = [{k: v for k, v in r.items() if k != "bbox"} for r in noisy_predictions(gt, seed=1)]
    results_path.write_text(json.dumps(no_boxes))
    out = tmp_path / "elsewhere"
    result = check(run_module("dist_kp.evaluate", ["--annotations", str(val_json(synthetic_root)),
                                                   "--results", str(results_path), "--out", str(out)]))
    assert "bbox (IoU)" not in result.stderr
    assert "bbox/AP" not in json.loads((out / "metrics.json").read_text())
