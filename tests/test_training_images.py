"""Which training images are kept: data.min_visible_keypoints follows the skeleton unless set, every drop is
logged with its reason, and resume compares the number the setting resolves to."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from dist_kp.config import DataConfig, load_config
from dist_kp.data.coco import min_visible_for_skeleton
from dist_kp.data.fingerprint import TRAINING_IMAGES, data_fingerprint
from dist_kp.data.index import index_from_coco
from dist_kp.data.loaders import build_train_loader, train_index, with_skeleton_defaults
from dist_kp.data.synthetic import generate
from dist_kp.engine.run_state import ResumeError, RunState
from dist_kp.storage import Storage
from tests.conftest import TINY_CONFIG, tiny_overrides
from tests.test_data import HAND_MADE
from tests.test_finetune import FIVE_KEYPOINTS, select_keypoints

CPU = torch.device("cpu")
DROPPED_AT_10 = 15  # of the 48 images of the five-keypoint set: fewer than 10 visible keypoints over all people


@pytest.fixture(scope="module")
def five_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 training images on a 5-keypoint skeleton (nose, shoulders, hips), cut from the synthetic set."""
    source = generate(tmp_path_factory.mktemp("seventeen"), train=48, val=4, seed=0)
    return select_keypoints(source, tmp_path_factory.mktemp("five") / "data", FIVE_KEYPOINTS)


def training_set(root: Path, tmp_path: Path, minimum: str, rank: int = 0) -> torch.utils.data.Dataset:
    cfg = load_config(TINY_CONFIG, tiny_overrides(root, tmp_path / "run", f"data.min_visible_keypoints={minimum}",
                                                  f"data.cache_dir={tmp_path / 'cache'}", "train.workers=0"))
    store = Storage.from_config(cfg.storage)
    loader, _ = build_train_loader(cfg, train_index(cfg, store), rank, 2, CPU, store)
    return loader.dataset


def test_the_default_minimum_is_the_references_10_of_17_scaled_to_the_skeleton() -> None:
    assert DataConfig().min_visible_keypoints is None
    assert [min_visible_for_skeleton(None, k) for k in (17, 5, 10, 1, 133)] == [10, 3, 6, 1, 78]
    assert min_visible_for_skeleton(7, 5) == 7 and min_visible_for_skeleton(0, 17) == 0  # a set value is kept


def test_the_default_on_a_five_keypoint_skeleton_keeps_the_images_the_old_default_of_10_dropped(
        five_root: Path, tmp_path: Path) -> None:
    assert len(training_set(five_root, tmp_path, "10")) == 48 - DROPPED_AT_10
    assert len(training_set(five_root, tmp_path, "null")) == 48  # 3 visible keypoints of 5


def test_every_dropped_image_is_logged_with_its_reason_and_count(five_root: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "dist_kp.data.loaders"):
        training_set(five_root, tmp_path, "10")
    assert (f"person_keypoints_train2017.json: training drops {DROPPED_AT_10} of 48 images: 0 without person "
            "annotations, 0 with only crowd annotations, 0 whose boxes are all empty inside the image, "
            f"{DROPPED_AT_10} with fewer than 10 visible keypoints (data.min_visible_keypoints)") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, "dist_kp.data.loaders"):
        training_set(five_root, tmp_path, "10", rank=1)  # only rank 0 says it
        training_set(five_root, tmp_path, "null")  # nothing dropped, nothing to say
    assert "training drops" not in caplog.text


def test_a_minimum_that_followed_the_skeleton_says_so_when_it_drops_images(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(TINY_CONFIG, tiny_overrides(tmp_path, tmp_path / "run", "data.min_visible_keypoints=null",
                                                  "train.batch_size=1"))
    index = index_from_coco(HAND_MADE, "hand.json")  # 4 images of 17 keypoints: 1 kept at 10
    (tmp_path / "train2017").mkdir()
    for image in HAND_MADE["images"]:  # the loader checks at start that the images are there
        Image.new("RGB", (image["width"], image["height"])).save(tmp_path / "train2017" / image["file_name"])
    with caplog.at_level(logging.INFO, "dist_kp.data.loaders"):
        build_train_loader(cfg, index, 0, 1, CPU, Storage())
    assert ("hand.json: training drops 3 of 4 images: 1 without person annotations, 1 with only crowd annotations, "
            "0 whose boxes are all empty inside the image, 1 with fewer than 10 visible keypoints "
            "(data.min_visible_keypoints); 10 follows the 17-keypoint skeleton (data.min_visible_keypoints=null: "
            "round(10 * 17 / 17))") in caplog.text


def test_resume_compares_the_resolved_minimum_so_a_run_that_set_10_on_coco_resumes_with_the_default() -> None:
    written = load_config(TINY_CONFIG, ["data.min_visible_keypoints=10"])  # as the COCO config always set it
    checkpoint = {"config": written.model_dump(mode="json")}
    now = load_config(TINY_CONFIG, ["data.min_visible_keypoints=null"])
    seventeen = index_from_coco(HAND_MADE, "hand.json")
    RunState(with_skeleton_defaults(now, seventeen), {}).check_compatible(checkpoint, "an older checkpoint")
    five = dict(HAND_MADE, categories=[dict(HAND_MADE["categories"][0], keypoints=FIVE_KEYPOINTS, skeleton=[])],
                annotations=[dict(a, keypoints=a["keypoints"][:15]) for a in HAND_MADE["annotations"]])
    with pytest.raises(ResumeError, match=r"data.min_visible_keypoints \(10 in the checkpoint, 3 now\)"):
        RunState(with_skeleton_defaults(now, index_from_coco(five, "five.json")), {}).check_compatible(
            checkpoint, "a checkpoint of another run")


def test_the_data_fingerprint_counts_the_images_of_the_resolved_minimum(five_root: Path, tmp_path: Path) -> None:
    cfg = load_config(TINY_CONFIG, tiny_overrides(five_root, tmp_path / "run", "data.min_visible_keypoints=null",
                                                  f"data.cache_dir={tmp_path / 'cache'}"))
    index = train_index(cfg, Storage())
    assert data_fingerprint(index, None)[TRAINING_IMAGES] == ("48", "48")
    assert data_fingerprint(index, None) == data_fingerprint(index, 3)
    assert data_fingerprint(index, 10)[TRAINING_IMAGES] == (str(48 - DROPPED_AT_10),) * 2
