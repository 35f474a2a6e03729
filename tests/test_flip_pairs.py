"""Horizontal-flip pairs: data.flip_pairs, pairs inferred from the common naming conventions, refusals at start."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from dist_kp.config import ConfigError, load_config
from dist_kp.data.coco import SampleKey
from dist_kp.data.flip_pairs import infer_flip_pairs, sided, training_flip_pairs
from dist_kp.data.index import KeypointMeta
from dist_kp.data.loaders import build_train_loader, train_index
from dist_kp.data.synthetic import COCO_KEYPOINT_NAMES
from dist_kp.engine.run_state import config_changes, identity_changes
from dist_kp.predict import load_predictor
from dist_kp.storage import Storage
from dist_kp.train import run
from tests.conftest import TINY_CONFIG, tiny_overrides
from tests.test_finetune import select_keypoints

OPENPOSE = ["Nose", "LShoulder", "RShoulder", "LHip", "RHip"]
COCO_NAMES_OF_OPENPOSE = ["nose", "left_shoulder", "right_shoulder", "left_hip", "right_hip"]
CPU = torch.device("cpu")
QUICK = ("train.workers=0", "eval.every_epochs=0", "eval.at_end=false", "data.min_visible_keypoints=1")


@pytest.mark.parametrize(("name", "mirror"), [
    ("left_eye", "right_eye"), ("right_ankle", "left_ankle"), ("LEFT_EYE", "RIGHT_EYE"), ("Left-Eye", "Right-Eye"),
    ("left.knee", "right.knee"), ("left hand", "right hand"),
    ("l_eye", "r_eye"), ("R_Ear", "L_Ear"), ("l-knee", "r-knee"), ("L Shoulder", "R Shoulder"),
    ("eye_left", "eye_right"), ("Knee-Right", "Knee-Left"), ("eye_l", "eye_r"), ("WRIST.R", "WRIST.L"),
    ("leftEye", "rightEye"), ("RightHand", "LeftHand"), ("ShoulderLeft", "ShoulderRight"),
    ("LShoulder", "RShoulder"), ("RHip", "LHip"), ("LBigToe", "RBigToe"),
    ("Nose", None), ("Neck", None), ("Rump", None), ("Lip", None), ("head_top", None), ("lower_lip", None),
    ("nose", None), ("tail", None), ("LED", None), ("L1", None), ("leftover", None), ("rightwing", None),
    ("Lower_lip", None), ("right", None), ("left_", None), ("_l", None), ("upper_r1", None), ("Rear", None),
])
def test_a_name_says_its_side_by_the_common_conventions_and_only_then(name: str, mirror: str | None) -> None:
    found = sided(name)
    assert (found.mirror if found else None) == mirror


def test_openpose_style_names_get_their_pairs() -> None:
    assert infer_flip_pairs(OPENPOSE) == ([("LShoulder", "RShoulder"), ("LHip", "RHip")], [])
    assert KeypointMeta(1, OPENPOSE, []).flip_permutation == [0, 2, 1, 4, 3]


def test_pairs_list_the_left_name_first_and_find_a_partner_in_another_case() -> None:
    assert infer_flip_pairs(["right_eye", "Left_Eye", "nose"]) == ([("Left_Eye", "right_eye")], [])


def test_sided_names_without_a_partner_are_reported() -> None:
    assert infer_flip_pairs(["Nose", "LEar", "LShoulder", "RShoulder", "left_tail"]) == (
        [("LShoulder", "RShoulder")], ["LEar", "left_tail"])


def test_coco_names_give_the_same_permutation_as_before() -> None:
    assert KeypointMeta(1, COCO_KEYPOINT_NAMES, []).flip_permutation == [
        0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]


def config(*overrides: str):
    return load_config(TINY_CONFIG, list(overrides)).data


def test_data_flip_pairs_are_used_as_given() -> None:
    names = ["head", "paw1", "paw2", "LEar"]
    flips = training_flip_pairs(config("data.flip_pairs=[[paw1, paw2]]"), names, "animals.json")
    assert flips.permutation(names) == [0, 2, 1, 3]
    assert flips.describe() == "horizontal flip pairs (data.flip_pairs): paw1<->paw2"
    none = training_flip_pairs(config("data.flip_pairs=[]"), names, "animals.json")
    assert none.permutation(names) == [0, 1, 2, 3]


def test_data_flip_pairs_naming_an_unknown_keypoint_are_refused_listing_the_skeleton() -> None:
    with pytest.raises(ConfigError, match=r"data.flip_pairs names 'LEar', not a keypoint of animals.json; "
                                          r"its keypoints are: head, paw1, paw2"):
        training_flip_pairs(config("data.flip_pairs=[[paw1, paw2], [LEar, paw3]]"), ["head", "paw1", "paw2", "paw3"],
                            "animals.json")


@pytest.mark.parametrize("pairs", ["[[a, b], [b, c]]", "[[a, b], [c, a]]", "[[a, a]]"])
def test_a_keypoint_in_two_pairs_is_refused_by_the_config(pairs: str) -> None:
    with pytest.raises(ConfigError, match=r"data\.flip_pairs"):
        config(f"data.flip_pairs={pairs}")


def test_a_sided_name_without_a_partner_is_refused_when_flips_are_on() -> None:
    names = ["Nose", "LEar", "LShoulder", "RShoulder"]
    with pytest.raises(ConfigError) as refused:
        training_flip_pairs(config(), names, "ears.json")
    message = str(refused.value)
    assert "ears.json: keypoints that look left/right-sided but have no partner: 'LEar' (" in message
    assert "data.flip_pairs" in message and "data.hflip_prob=0" in message
    off = training_flip_pairs(config("data.hflip_prob=0"), names, "ears.json")
    assert off.pairs == (("LShoulder", "RShoulder"),)


def openpose_root(synthetic_root: Path, folder: Path, names: list[str]) -> Path:
    """The synthetic set cut to nose, shoulders and hips, the keypoints renamed to `names`."""
    root = select_keypoints(synthetic_root, folder, COCO_NAMES_OF_OPENPOSE)
    for split in ("train", "val"):
        path = root / "annotations" / f"person_keypoints_{split}2017.json"
        data = json.loads(path.read_text())
        data["categories"][0]["keypoints"] = names
        path.write_text(json.dumps(data))
    return root


def test_a_flipped_openpose_style_target_swaps_lshoulder_and_rshoulder(synthetic_root: Path, tmp_path: Path) -> None:
    root = openpose_root(synthetic_root, tmp_path / "data", OPENPOSE)
    targets = {}
    for prob in (0, 1):
        cfg = load_config(TINY_CONFIG, tiny_overrides(root, tmp_path / "run", *QUICK, f"data.hflip_prob={prob}"))
        store = Storage.from_config(cfg.storage)
        loader, _ = build_train_loader(cfg, train_index(cfg, store), 0, 1, CPU, store)
        image, targets[prob], _ = loader.dataset[SampleKey(0, 0)]
    width = image.shape[-1]
    plain, flipped = targets[0]["keypoints"], targets[1]["keypoints"]
    visible = plain[:, 2, 2] > 0
    assert visible.any()
    left, right = OPENPOSE.index("LShoulder"), OPENPOSE.index("RShoulder")
    assert torch.equal(flipped[visible, left, 0], width - plain[visible, right, 0])  # the old right is now left
    assert torch.equal(flipped[visible, left, 2], plain[visible, right, 2])
    assert torch.equal(flipped[:, 0, 0][plain[:, 0, 2] > 0], width - plain[:, 0, 0][plain[:, 0, 2] > 0])  # Nose


def test_training_logs_the_pairs_and_records_them_in_model_final(
    synthetic_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = openpose_root(synthetic_root, tmp_path / "data", OPENPOSE)
    out = tmp_path / "run"
    caplog.set_level(logging.INFO)
    cfg = load_config(TINY_CONFIG, tiny_overrides(root, out, *QUICK, "train.max_steps=1"))
    assert run(cfg) == 0
    logged = [r.getMessage() for r in caplog.records if "horizontal flip pairs" in r.getMessage()]
    assert logged == ["horizontal flip pairs (inferred from names): LShoulder<->RShoulder, LHip<->RHip"]
    final = torch.load(out / "model_final.pt", weights_only=True)
    assert final["keypoints"]["flip_pairs"] == [["LShoulder", "RShoulder"], ["LHip", "RHip"]]
    _, meta = load_predictor(str(out / "model_final.pt"), CPU)
    assert meta.flip_permutation == [0, 2, 1, 4, 3]


def test_explicit_pairs_reach_model_final_and_its_export_permutation(synthetic_root: Path, tmp_path: Path) -> None:
    names = ["Head", "Arm1", "Arm2", "Leg1", "Leg2"]
    root = openpose_root(synthetic_root, tmp_path / "data", names)
    out = tmp_path / "run"
    cfg = load_config(TINY_CONFIG, tiny_overrides(root, out, *QUICK, "train.max_steps=1",
                                                  "data.flip_pairs=[[Arm1, Arm2], [Leg1, Leg2]]"))
    assert run(cfg) == 0
    _, meta = load_predictor(str(out / "model_final.pt"), CPU)
    assert meta.flip_permutation == [0, 2, 1, 4, 3]


def test_training_with_a_sided_name_without_partner_is_refused_before_anything_is_written(
    synthetic_root: Path, tmp_path: Path
) -> None:
    root = openpose_root(synthetic_root, tmp_path / "data", ["Nose", "LEar", "LShoulder", "LHip", "RHip"])
    out = tmp_path / "run"
    cfg = load_config(TINY_CONFIG, tiny_overrides(root, out, *QUICK, "train.max_steps=1"))
    with pytest.raises(ConfigError, match=r"have no partner: 'LEar', 'LShoulder' .*"
                                          r"data\.flip_pairs.*data\.hflip_prob=0"):
        run(cfg)
    assert not out.exists()


def test_changed_flip_pairs_are_applied_at_resume_like_hflip_prob() -> None:
    saved = load_config(TINY_CONFIG, []).model_dump(mode="json")
    changes = config_changes(saved, load_config(TINY_CONFIG, ["data.flip_pairs=[[a, b]]", "data.hflip_prob=0.2"])
                             .model_dump(mode="json"))
    assert set(changes) == {"data.flip_pairs", "data.hflip_prob"} and identity_changes(changes) == []
