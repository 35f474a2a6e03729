"""Hostile data (issue 12): 16-bit PNGs, file names leaving the image folder, images whose size differs
from their record, keypoints outside the image, a training set that filtering leaves empty."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_kp.config import load_config
from dist_kp.data.coco import KeypointDataset, SampleKey, leaves_folder, training_filter
from dist_kp.data.index import DataError, index_from_coco, load_index
from dist_kp.data.index_cache import cached_index
from dist_kp.data.loaders import build_train_loader, train_index
from dist_kp.data.synthetic import generate
from dist_kp.storage import Storage
from tests.conftest import TINY_CONFIG, tiny_overrides
from tests.test_data import HAND_MADE, person


def small_set(tmp_path: Path, train: int = 4) -> tuple[Path, dict]:
    """A generated root and its parsed training annotations (to edit and write back with save)."""
    root = generate(tmp_path / "d", train=train, val=1, seed=3)
    return root, json.loads(train_json(root).read_text())


def train_json(root: Path) -> Path:
    return root / "annotations" / "person_keypoints_train2017.json"


def save(root: Path, data: dict) -> Path:
    train_json(root).write_text(json.dumps(data))
    return train_json(root)


def test_16_bit_png_gives_the_same_uint8_0_255_values_as_its_8_bit_original(tmp_path: Path) -> None:
    root, data = small_set(tmp_path)
    record = data["images"][0]
    original = np.random.default_rng(0).integers(0, 256, (record["height"], record["width"]), dtype=np.uint8)
    original[0, :3] = [0, 128, 255]
    record["file_name"] = "deep.png"
    Image.fromarray(original.astype(np.uint16) * 257).save(root / "train2017" / "deep.png")  # 16-bit grey PNG
    index = load_index(str(save(root, data)), Storage())
    for train in (True, False):
        dataset = KeypointDataset(index, str(root / "train2017"), Storage(), train=train)
        item = [int(index.image_ids[p]) for p in dataset.positions].index(record["id"])
        image = dataset[SampleKey(item, 0) if train else item][0]
        assert image.dtype == torch.uint8  # the device transfer divides by 255
        assert torch.equal(image, torch.from_numpy(original).expand(3, -1, -1))


@pytest.mark.parametrize("name, leaves", [
    ("../../outside/x.jpg", True), ("a/../../x.jpg", True), ("..", True), ("/etc/passwd", True),
    ("s3://other-bucket/x.jpg", True), ("sub/x.jpg", False), ("sub/../x.jpg", False), ("..x.jpg", False),
    ("x..jpg", False),
])
def test_a_file_name_leaves_the_image_folder_when_absolute_a_url_or_climbing_out(name: str, leaves: bool) -> None:
    assert leaves_folder(name) is leaves


def test_file_names_leaving_the_image_folder_are_refused_counted_and_named(tmp_path: Path) -> None:
    root, data = small_set(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.jpg").write_bytes((root / "train2017" / data["images"][0]["file_name"]).read_bytes())
    # train2017/../../outside/x.jpg is tmp_path/outside/x.jpg: a real file outside data.root.
    data["images"][0]["file_name"] = "../../outside/x.jpg"
    data["images"][2]["file_name"] = str(outside / "x.jpg")
    path = save(root, data)
    message = (r"2 image file names leave the image folder .*train2017: "
               rf"image id={data['images'][0]['id']} file_name='\.\./\.\./outside/x\.jpg', "
               rf"image id={data['images'][2]['id']} file_name='{outside}/x\.jpg'")
    for index in (load_index(str(path), Storage()), cached_index(str(path), Storage(), tmp_path / "cache", 0)):
        for train in (True, False):
            with pytest.raises(DataError, match=message):
                KeypointDataset(index, str(root / "train2017"), Storage(), train=train)


def test_image_whose_size_differs_from_its_record_is_skipped_in_training_and_refused_in_evaluation(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, data = small_set(tmp_path)
    index = load_index(str(train_json(root)), Storage())
    train = KeypointDataset(index, str(root / "train2017"), Storage(), train=True)
    first = int(train.positions[0])
    victim = root / "train2017" / index.file_names[first]
    Image.new("RGB", (1, 1)).save(victim, format="JPEG")
    with caplog.at_level(logging.WARNING, "dist_kp.data.coco"):
        image, target, skipped = train[SampleKey(0, 0)]
    assert skipped == 1  # counted like an unreadable image, and the batch keeps its size
    assert target["image_id"].item() == int(index.image_ids[train.positions[1]])
    size = f"{index.widths[first]}x{index.heights[first]}"
    assert f"skipping training image {victim}: {victim} is 1x1 pixels, but image id={index.image_ids[first]}" \
        in caplog.text and f"is {size}" in caplog.text
    evaluation = KeypointDataset(index, str(root / "train2017"), Storage(), train=False)
    with pytest.raises(DataError, match=f"cannot read evaluation image {victim}: .* is 1x1 pixels.* is {size}"):
        evaluation[first]


def test_visible_keypoints_outside_the_image_are_warned_with_a_count_and_an_example(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    data = json.loads(json.dumps(HAND_MADE))
    nose = data["annotations"][0]["keypoints"]
    nose[:3] = [1100.0, 20.0, 2]  # image 7 is 100x80
    data["annotations"][0]["keypoints"][3:6] = [10.0, -1000.0, 1]
    index = index_from_coco(data, "hand.json")
    with caplog.at_level(logging.WARNING, "dist_kp.data.coco"):
        KeypointDataset(index, str(tmp_path), Storage(), train=True, min_visible_keypoints=10)
    assert ("hand.json: 2 visible keypoints of 1 training annotations lie outside their image, e.g. annotation "
            "id=1 of image id=7 (100x80): nose at (1100, 20)") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, "dist_kp.data.coco"):
        KeypointDataset(index_from_coco(HAND_MADE, "hand.json"), str(tmp_path), Storage(), train=True,
                        min_visible_keypoints=10)
    assert "outside their image" not in caplog.text


def test_training_filter_counts_each_dropped_image_once_by_its_reason() -> None:
    data = json.loads(json.dumps(HAND_MADE))
    data["images"].append({"id": 13, "file_name": "e.jpg", "width": 50, "height": 50})
    data["annotations"] += [person(6, 13, [60.0, 10.0, 20.0, 20.0], visible=17),  # right of the 50 px image
                            person(7, 13, [5.0, 5.0, 20.0, 20.0], visible=17, crowd=1)]
    report = training_filter(index_from_coco(data, "hand.json"), 10)
    assert report.positions.tolist() == [1]  # image 7 (positions are in image id order: 3, 7, 9, 11, 13)
    assert (report.images, report.without_annotations, report.only_crowd, report.only_empty_boxes,
            report.too_few_keypoints) == (5, 1, 1, 1, 1)
    assert report.describe() == (
        "1 of 5 images kept; dropped: 1 without person annotations, 1 with only crowd annotations, 1 whose boxes "
        "are all empty inside the image, 1 with fewer than 10 visible keypoints (data.min_visible_keypoints)")


def test_training_set_whose_boxes_are_all_empty_is_refused_naming_empty_boxes_not_keypoints(tmp_path: Path) -> None:
    root, data = small_set(tmp_path, train=6)
    for ann in data["annotations"]:
        ann["bbox"][2] = 0.0
    save(root, data)
    cfg = load_config(TINY_CONFIG, tiny_overrides(root, tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}"))
    store = Storage.from_config(cfg.storage)
    with pytest.raises(DataError, match=r"no training images left after filtering \(0 of 6 images kept; dropped: "
                                        r"0 without person annotations, 0 with only crowd annotations, 6 whose boxes "
                                        r"are all empty inside the image, 0 with fewer than"):
        build_train_loader(cfg, train_index(cfg, store), rank=0, world_size=1, device=torch.device("cpu"), storage=store)


def test_fewer_training_images_than_processes_is_refused_counting_each_dropped_image(tmp_path: Path) -> None:
    cfg = load_config(TINY_CONFIG, tiny_overrides(tmp_path, tmp_path / "run", "data.min_visible_keypoints=10"))
    index = index_from_coco(HAND_MADE, "hand.json")
    assert len(KeypointDataset(index, str(tmp_path), Storage(), train=True, min_visible_keypoints=10)) == 1
    with pytest.raises(ValueError, match=r"hand.json: fewer training images than the 2 processes .*\(1 of 4 images "
                                         r"kept; dropped: 1 without person annotations, 1 with only crowd"):
        build_train_loader(cfg, index, rank=0, world_size=2, device=torch.device("cpu"),
                           storage=Storage.from_config(cfg.storage))


def test_a_wrong_training_image_folder_is_one_error_naming_the_folder_and_the_missing_count(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, _ = small_set(tmp_path, train=6)
    cfg = load_config(TINY_CONFIG, tiny_overrides(root, tmp_path / "run", "data.train_images=train2017_typo",
                                                  f"data.cache_dir={tmp_path / 'cache'}"))
    store = Storage.from_config(cfg.storage)
    index = train_index(cfg, store)
    kept = len(KeypointDataset(index, str(root / "train2017"), store, train=True,
                               min_visible_keypoints=cfg.data.min_visible_keypoints))
    first = ", ".join(index.file_names[i] for i in range(3))
    with caplog.at_level(logging.WARNING), pytest.raises(DataError) as refused:
        build_train_loader(cfg, index, rank=0, world_size=1, device=torch.device("cpu"), storage=store)
    assert str(refused.value).startswith(
        f"data.train_images={root}/train2017_typo: {kept} of {kept} training images listed in {index.source} are "
        f"missing (first: {first}, ...); point data.train_images (relative to data.root) at the folder")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []  # no warning per image before it


def test_a_few_missing_training_images_are_warned_about_once_and_skipped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, _ = small_set(tmp_path, train=6)
    cfg = load_config(TINY_CONFIG, tiny_overrides(root, tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}",
                                                  "train.workers=0", "data.min_visible_keypoints=0"))
    store = Storage.from_config(cfg.storage)
    index = train_index(cfg, store)
    gone = index.file_names[0]
    (root / "train2017" / gone).unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loader, _ = build_train_loader(cfg, index, rank=0, world_size=1, device=torch.device("cpu"), storage=store)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"data.train_images={root}/train2017: 1 of 6 training images listed in {index.source} are missing "
        f"(first: {gone}); training skips them"]
    assert sum(skipped for _, _, skipped in loader) == 1
