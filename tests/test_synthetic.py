"""The synthetic generator writes a COCO person-keypoints set with real JPEG files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from dist_kp.data.synthetic import COCO_KEYPOINT_NAMES, generate, main, select_keypoints


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_pycocotools_loads_the_json_and_every_image_exists_at_its_size(synthetic_root: Path) -> None:
    for split in ("train", "val"):
        coco = COCO(str(synthetic_root / "annotations" / f"person_keypoints_{split}2017.json"))
        assert coco.loadCats(1)[0]["keypoints"] == COCO_KEYPOINT_NAMES
        assert len(coco.getAnnIds()) >= len(coco.getImgIds())
        for image in coco.loadImgs(coco.getImgIds()):
            with Image.open(synthetic_root / f"{split}2017" / image["file_name"]) as picture:
                assert picture.format == "JPEG"
                assert picture.size == (image["width"], image["height"])


def test_images_come_in_landscape_and_portrait_with_one_to_three_people(synthetic_root: Path) -> None:
    data = json.loads((synthetic_root / "annotations" / "person_keypoints_train2017.json").read_text())
    shapes = {im["width"] > im["height"] for im in data["images"]} | {im["width"] < im["height"] for im in data["images"]}
    assert shapes == {True, False}
    per_image: dict[int, int] = {}
    for ann in data["annotations"]:
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
    assert set(per_image.values()) <= {1, 2, 3} and len(set(per_image.values())) > 1


def test_unlabeled_keypoints_are_zero_and_some_are_occluded(synthetic_root: Path) -> None:
    data = json.loads((synthetic_root / "annotations" / "person_keypoints_train2017.json").read_text())
    triples = [ann["keypoints"][i:i + 3] for ann in data["annotations"] for i in range(0, 51, 3)]
    assert all(t == [0, 0, 0] for t in triples if t[2] == 0)
    assert {t[2] for t in triples} == {0, 1, 2}


def test_same_seed_gives_byte_identical_output(tmp_path: Path) -> None:
    a = tree_digest(generate(tmp_path / "a", train=6, val=2, seed=7))
    b = tree_digest(generate(tmp_path / "b", train=6, val=2, seed=7))
    c = tree_digest(generate(tmp_path / "c", train=6, val=2, seed=8))
    assert a == b
    assert a != c


def test_a_keypoint_subset_keeps_the_named_keypoints_of_the_same_people_in_the_order_given(tmp_path: Path) -> None:
    names = ["right_hip", "nose", "left_shoulder", "right_shoulder", "left_hip"]
    assert main(["--out", str(tmp_path / "five"), "--train", "4", "--val", "2", "--edge-cases",
                 "--keypoints", ",".join(names)]) == 0
    full = generate(tmp_path / "full", train=4, val=2, edge_cases=True)
    five = tree_digest(tmp_path / "five")
    assert {k: v for k, v in five.items() if k.endswith(".jpg")} == \
        {k: v for k, v in tree_digest(full).items() if k.endswith(".jpg")}
    data = json.loads((tmp_path / "five/annotations/person_keypoints_train2017.json").read_text())
    source = json.loads((full / "annotations/person_keypoints_train2017.json").read_text())
    assert data == select_keypoints(source, names)
    assert data["categories"][0]["keypoints"] == names
    # COCO's limbs between kept joints (12-13, 6-12, 7-13, 6-7), numbered as given.
    assert data["categories"][0]["skeleton"] == [[5, 1], [3, 5], [4, 1], [3, 4]]
    for kept, original in zip(data["annotations"], source["annotations"]):
        coco = original["keypoints"]
        assert kept["keypoints"] == [v for name in names for v in coco[3 * COCO_KEYPOINT_NAMES.index(name):][:3]]
        assert kept["num_keypoints"] == sum(1 for v in kept["keypoints"][2::3] if v > 0)


def test_an_unknown_keypoint_to_keep_is_refused_naming_the_known_ones(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_status:
        main(["--out", str(tmp_path / "x"), "--train", "1", "--val", "1", "--keypoints", "nose,tail"])
    assert exit_status.value.code == 2
    message = capsys.readouterr().err
    assert "--keypoints: keypoints to keep ['nose', 'tail']: give each once, from nose, left_eye," in message
    assert not (tmp_path / "x").exists()
