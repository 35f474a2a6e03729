"""Result records built with numpy over a batch are the records built one detection at a time;
sent to rank 0 as arrays, they come back the same."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from dist_kp.evaluation.results import EvaluationError, ResultColumns, outputs_to_results, round_half_even


def per_detection_reference(outputs: list[dict[str, torch.Tensor]], image_ids: list[int],
                            category_id: int) -> list[dict]:
    """The records as dist_kp built them before the vectorised version (one Python round per value).

    (That version failed on an image without detections: torch cannot reshape [0, K, 3] to [0, -1].)
    """
    records = []
    for output, image_id in zip(outputs, image_ids):
        if not len(output["scores"]):
            continue
        boxes = output["boxes"].detach().cpu().double()
        boxes[:, 2:] -= boxes[:, :2]
        keypoints = output["keypoints"].detach().cpu().double()
        keypoints[..., 2] = 1.0
        for box, kps, score in zip(boxes.tolist(), keypoints.reshape(len(boxes), -1).tolist(),
                                   output["scores"].detach().cpu().tolist()):
            records.append({"image_id": int(image_id), "category_id": category_id,
                            "bbox": [round(v, 2) for v in box], "keypoints": [round(v, 2) for v in kps],
                            "score": round(float(score), 4)})
    return records


def fake_output(rng: np.random.Generator, n: int, num_keypoints: int = 17,
                ties: bool = True) -> dict[str, torch.Tensor]:
    """Model-like outputs (float32); with `ties`, many values at or next to a rounding tie (x.xx5, x.xxxx5)."""
    xy = rng.uniform(0, 640, (n, 2))
    wh = rng.uniform(1, 300, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    kps = np.stack([rng.uniform(0, 640, (n, num_keypoints)), rng.uniform(0, 480, (n, num_keypoints)),
                    rng.uniform(0, 1, (n, num_keypoints))], 2)
    scores = rng.uniform(0, 1, n)
    if ties:
        near = rng.random(kps.shape) < 0.3
        kps[near] = np.floor(kps[near] * 100) / 100 + 0.005
        boxes[:, :2] = np.where(rng.random((n, 2)) < 0.5, np.floor(boxes[:, :2] * 100) / 100 + 0.005, boxes[:, :2])
        scores[: n // 2] = np.floor(scores[: n // 2] * 10000) / 10000 + 0.00005
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "keypoints": torch.tensor(kps, dtype=torch.float32),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.ones(n, dtype=torch.int64)}


def test_batch_records_equal_the_per_detection_records_value_for_value() -> None:
    rng = np.random.default_rng(0)
    outputs = [fake_output(rng, n) for n in (7, 0, 40, 1, 25)]
    image_ids = [3, 9, 12, 40, 41]
    new = outputs_to_results(outputs, image_ids, category_id=1)
    old = per_detection_reference(outputs, image_ids, category_id=1)
    assert len(new) == 73
    assert json.dumps(new) == json.dumps(old)  # same values, types, key order and signs of zero


def test_images_without_detections_give_no_records() -> None:
    rng = np.random.default_rng(1)
    assert outputs_to_results([fake_output(rng, 0), fake_output(rng, 0)], [1, 2], 1) == []
    assert [r["image_id"] for r in outputs_to_results([fake_output(rng, 0), fake_output(rng, 2)], [1, 2], 1)] == [2, 2]
    assert outputs_to_results([], [], 1) == []


def test_round_half_even_is_pythons_round_on_every_element() -> None:
    rng = np.random.default_rng(2)
    values = np.concatenate([
        rng.uniform(-1000, 1000, 200_000),
        np.floor(rng.uniform(-1000, 1000, 100_000) * 100) / 100 + 0.005,  # doubles next to a 2-digit tie
        np.arange(-5000, 5000) / 1000 + 0.0005,  # and next to 3-digit ones, seen at 2 and 4 digits
        np.float32(rng.uniform(0, 640, 100_000)).astype(np.float64),
        np.array([0.0, -0.0, -0.001, 0.004, 2.675, 1.005, 0.125, 0.375, np.inf, -np.inf]),
    ])
    for ndigits in (2, 4):
        expected = np.array([round(v, ndigits) for v in values.tolist()])
        got = round_half_even(values, ndigits)
        assert np.array_equal(got, expected) and np.array_equal(np.signbit(got), np.signbit(expected))
    assert np.isnan(round_half_even(np.array([np.nan]), 2)).all()


def per_annotation_reference(index, positions: np.ndarray) -> dict:
    """The ground-truth dict as dist_kp built it before (one Python float() per value)."""
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


def test_ground_truth_equals_the_per_annotation_build(synthetic_root) -> None:
    from dist_kp.data.index import load_index
    from dist_kp.storage import Storage
    from dist_kp.evaluation.results import ground_truth

    index = load_index(str(synthetic_root / "annotations" / "person_keypoints_val2017.json"), Storage())
    for positions in (np.arange(len(index)), np.arange(1, len(index), 3), np.zeros(0, np.int64)):
        assert json.dumps(ground_truth(index, positions)) == json.dumps(per_annotation_reference(index, positions))
    assert ground_truth(index) == ground_truth(index, np.arange(len(index)))


def test_records_sent_as_arrays_come_back_equal_value_for_value() -> None:
    rng = np.random.default_rng(1)
    records = outputs_to_results([fake_output(rng, n) for n in (5, 0, 30)], [7, 8, 9], category_id=1)
    columns = pickle.loads(pickle.dumps(ResultColumns.from_records(records)))
    assert json.dumps(columns.records()) == json.dumps(records)  # values, types, key order, signs of zero
    assert ResultColumns.from_records([]).records() == []


def test_a_record_with_other_keys_is_refused_rather_than_sent_without_them() -> None:
    records = outputs_to_results([fake_output(np.random.default_rng(2), 3)], [7], category_id=1)
    records[1]["area"] = 12.0
    with pytest.raises(EvaluationError, match=r"result record 1 .* has other keys than image_id, category_id"):
        ResultColumns.from_records(records)
