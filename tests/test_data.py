"""Dataset targets, training filters and the horizontal flip."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_kp.data.coco import KeypointDataset, SampleKey, build_target
from dist_kp.data.index import DataError, index_from_coco, load_index
from dist_kp.data.synthetic import COCO_KEYPOINT_NAMES, COCO_SKELETON, generate
from dist_kp.data.transforms import horizontal_flip
from dist_kp.storage import Storage


def person(ann_id: int, image_id: int, bbox: list[float], visible: int, crowd: int = 0) -> dict:
    keypoints = []
    for k in range(17):
        keypoints += [10.0 + k, 20.0 + k, 2] if k < visible else [0, 0, 0]
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": bbox, "keypoints": keypoints,
            "num_keypoints": visible, "area": bbox[2] * bbox[3], "iscrowd": crowd}


HAND_MADE = {
    "images": [
        {"id": 7, "file_name": "a.jpg", "width": 100, "height": 80},
        {"id": 3, "file_name": "b.jpg", "width": 60, "height": 90},
        {"id": 9, "file_name": "c.jpg", "width": 50, "height": 50},
        {"id": 11, "file_name": "d.jpg", "width": 50, "height": 50},
    ],
    "annotations": [
        # image 7: a person hanging over the right edge, a crowd region, a zero-width box
        person(1, 7, [90.0, 10.0, 30.0, 50.0], visible=12),
        person(2, 7, [5.0, 5.0, 20.0, 20.0], visible=0, crowd=1),
        person(3, 7, [40.0, 10.0, 0.0, 30.0], visible=17),
        # image 3: too few visible keypoints for training
        person(4, 3, [10.0, 10.0, 20.0, 40.0], visible=4),
        # image 9: only a crowd annotation; image 11: no annotation at all
        person(5, 9, [0.0, 0.0, 50.0, 50.0], visible=17, crowd=1),
    ],
    "categories": [{"id": 1, "name": "person", "keypoints": COCO_KEYPOINT_NAMES, "skeleton": COCO_SKELETON}],
}


def test_target_matches_the_json_for_a_hand_checked_image() -> None:
    index = index_from_coco(HAND_MADE, "hand.json")
    i = list(index.image_ids).index(7)
    target = build_target(index, i, train=True)
    # The crowd region and the zero-width box are dropped; the box is clamped to the 100 px width.
    assert target["boxes"].tolist() == [[90.0, 10.0, 100.0, 60.0]]
    assert target["labels"].tolist() == [1]
    assert target["image_id"].item() == 7
    assert target["keypoints"].shape == (1, 17, 3)
    assert target["keypoints"][0, 0].tolist() == [10.0, 20.0, 2.0]
    assert target["keypoints"][0, 12].tolist() == [0.0, 0.0, 0.0]
    evaluation = build_target(index, i, train=False)
    assert len(evaluation["boxes"]) == 3  # evaluation keeps every annotation


def test_training_drops_images_without_enough_visible_keypoints(tmp_path: Path) -> None:
    index = index_from_coco(HAND_MADE, "hand.json")
    train = KeypointDataset(index, str(tmp_path), Storage(), train=True, min_visible_keypoints=10)
    assert [int(index.image_ids[p]) for p in train.positions] == [7]
    lenient = KeypointDataset(index, str(tmp_path), Storage(), train=True, min_visible_keypoints=1)
    assert sorted(int(index.image_ids[p]) for p in lenient.positions) == [3, 7]
    evaluation = KeypointDataset(index, str(tmp_path), Storage(), train=False)
    assert len(evaluation) == 4


def test_not_coco_json_is_refused_naming_the_file_and_record(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="broken.json.*annotations"):
        load_index(str(path), Storage())
    bad = json.loads(json.dumps(HAND_MADE))
    bad["annotations"][0]["keypoints"] = [1, 2, 2]
    with pytest.raises(DataError, match="hand.json: annotation id=1.*3 keypoint values, expected 51"):
        index_from_coco(bad, "hand.json")


def test_flip_pairs_come_from_the_keypoint_names() -> None:
    index = index_from_coco(HAND_MADE, "hand.json")
    perm = index.meta.flip_permutation
    names = COCO_KEYPOINT_NAMES
    assert names[perm[names.index("left_eye")]] == "right_eye"
    assert names[perm[names.index("right_ankle")]] == "left_ankle"
    assert perm[names.index("nose")] == names.index("nose")
    custom = json.loads(json.dumps(HAND_MADE))
    custom["categories"][0]["keypoints"] = ["head", "left_paw", "right_paw", "tail", "left_ear", "right_ear"] + \
        [f"extra{i}" for i in range(11)]
    custom_perm = index_from_coco(custom, "custom.json").meta.flip_permutation
    assert custom_perm[:6] == [0, 2, 1, 3, 5, 4]


def flip_case() -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int]]:
    image = torch.arange(3 * 4 * 6, dtype=torch.uint8).reshape(3, 4, 6)
    keypoints = torch.zeros(1, 17, 3)
    keypoints[0, 1] = torch.tensor([1.0, 2.0, 2.0])  # left_eye
    keypoints[0, 2] = torch.tensor([4.5, 2.0, 1.0])  # right_eye
    target = {"boxes": torch.tensor([[1.0, 0.5, 3.0, 3.5]]), "keypoints": keypoints, "labels": torch.tensor([1])}
    perm = index_from_coco(HAND_MADE, "hand.json").meta.flip_permutation
    return image, target, perm


def test_flip_mirrors_x_swaps_left_right_and_keeps_unlabeled_zero() -> None:
    image, target, perm = flip_case()
    flipped_image, flipped = horizontal_flip(image, target, perm)
    assert torch.equal(flipped_image, image.flip(-1))
    assert flipped["boxes"].tolist() == [[3.0, 0.5, 5.0, 3.5]]
    assert flipped["keypoints"][0, 2].tolist() == [5.0, 2.0, 2.0]  # old left_eye is now right_eye
    assert flipped["keypoints"][0, 1].tolist() == [1.5, 2.0, 1.0]
    unlabeled = flipped["keypoints"][0][flipped["keypoints"][0, :, 2] == 0]
    assert len(unlabeled) == 15 and torch.all(unlabeled == 0)


def test_flipping_twice_is_identity() -> None:
    image, target, perm = flip_case()
    twice_image, twice = horizontal_flip(*horizontal_flip(image, target, perm), perm)
    assert torch.equal(twice_image, image)
    assert torch.equal(twice["boxes"], target["boxes"])
    assert torch.equal(twice["keypoints"], target["keypoints"])


def test_flip_decisions_depend_only_on_seed_epoch_and_sample(tmp_path: Path) -> None:
    root = generate(tmp_path / "d", train=12, val=1, seed=3)
    index = load_index(str(root / "annotations" / "person_keypoints_train2017.json"), Storage())
    dataset = KeypointDataset(index, str(root / "train2017"), Storage(), train=True, min_visible_keypoints=0,
                              hflip_prob=0.5)
    first = [dataset[SampleKey(i, 0)][1]["boxes"] for i in range(len(dataset))]
    again = [dataset[SampleKey(i, 0)][1]["boxes"] for i in reversed(range(len(dataset)))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other_epoch = [dataset[SampleKey(i, 1)][1]["boxes"] for i in range(len(dataset))]
    assert any(not torch.equal(a, b) for a, b in zip(first, other_epoch))
    image, target, skipped = dataset[SampleKey(0, 0)]
    assert image.dtype == torch.uint8 and image.shape[0] == 3 and skipped == 0


def test_unreadable_training_image_is_skipped_and_counted(tmp_path: Path) -> None:
    root = generate(tmp_path / "d", train=4, val=1, seed=3)
    index = load_index(str(root / "annotations" / "person_keypoints_train2017.json"), Storage())
    dataset = KeypointDataset(index, str(root / "train2017"), Storage(), train=True, min_visible_keypoints=0)
    (root / "train2017" / index.file_names[int(dataset.positions[0])]).write_bytes(b"not a jpeg")
    image, target, skipped = dataset[SampleKey(0, 0)]
    assert skipped == 1
    assert target["image_id"].item() == int(index.image_ids[dataset.positions[1]])
    assert np.array_equal(image.shape[1:], (index.heights[dataset.positions[1]], index.widths[dataset.positions[1]]))


def test_dataset_carries_its_storage_into_loader_workers(tmp_path: Path) -> None:
    storage = Storage({"anon": True}, timeout_s=5.0)
    dataset = KeypointDataset(index_from_coco(HAND_MADE, "hand.json"), str(tmp_path), storage, train=False)
    assert pickle.loads(pickle.dumps(dataset)).storage == storage  # spawn/forkserver workers unpickle the dataset
