"""Fine-tuning on another skeleton: a 5-keypoint run starts from the model_final.pt of a 17-keypoint run, the
keypoint predictor's rows of the joints both name copied by joint name."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from dist_kp.config import load_config
from dist_kp.data import synthetic
from dist_kp.data.flip_pairs import flip_permutation, infer_flip_pairs
from dist_kp.data.synthetic import COCO_KEYPOINT_NAMES
from dist_kp.model.keypoint_rcnn import KEYPOINT_BIAS as BIAS
from dist_kp.model.keypoint_rcnn import KEYPOINT_LOGITS as LOGITS
from dist_kp.model.keypoint_rcnn import WeightsError, build_model
from tests.conftest import TINY_CONFIG, check, tiny_overrides, train_for_fixture, train_here
from tests.test_model import offline_torch_home  # noqa: F401 - the fixture: an empty hub cache, downloads refused

FIVE_KEYPOINTS = ["nose", "left_shoulder", "right_shoulder", "left_hip", "right_hip"]
FIVE_SIGMAS = "eval.sigmas=[0.026,0.079,0.079,0.107,0.107]"
KEYPOINT_PREDICTOR = {"roi_heads.keypoint_predictor.kps_score_lowres.weight",
                      "roi_heads.keypoint_predictor.kps_score_lowres.bias"}
QUICK = ("train.workers=0", "eval.every_epochs=0")


def select_keypoints(source: Path, out: Path, names: list[str]) -> Path:
    """A copy of a COCO keypoints dataset that keeps only the named keypoints (images linked, not copied)."""
    (out / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (out / f"{split}2017").symlink_to(source / f"{split}2017")
        data = json.loads((source / "annotations" / f"person_keypoints_{split}2017.json").read_text())
        (out / "annotations" / f"person_keypoints_{split}2017.json").write_text(
            json.dumps(synthetic.select_keypoints(data, names)))
    return out


@pytest.fixture(scope="module")
def coco_weights(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model_final.pt of a few steps of the tiny model on the 17-keypoint set."""
    out = tmp_path_factory.mktemp("coco_run")
    train_for_fixture(["--config", str(TINY_CONFIG), *tiny_overrides(
        synthetic_root, out, "train.max_steps=3", "eval.at_end=false", *QUICK)])
    return out / "model_final.pt"


@pytest.fixture(scope="module")
def five_keypoint_root(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return select_keypoints(synthetic_root, tmp_path_factory.mktemp("five") / "data", FIVE_KEYPOINTS)


def test_the_five_keypoint_set_is_a_valid_coco_set_with_mirrored_names(five_keypoint_root: Path) -> None:
    data = json.loads((five_keypoint_root / "annotations" / "person_keypoints_val2017.json").read_text())
    assert data["categories"][0]["keypoints"] == FIVE_KEYPOINTS
    assert data["categories"][0]["skeleton"] == [[4, 5], [2, 4], [3, 5], [2, 3]]  # COCO 12-13, 6-12, 7-13, 6-7
    assert all(len(a["keypoints"]) == 15 for a in data["annotations"])


def test_a_five_keypoint_run_loads_every_tensor_of_a_seventeen_keypoint_model_and_the_rows_of_its_joints(
        coco_weights: Path, five_keypoint_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    source = torch.load(coco_weights, map_location="cpu", weights_only=True)["model"]
    # The model the fine-tuning run starts from, before its first step (without names: by shape only).
    start = build_model(load_config(TINY_CONFIG, [f"model.weights={coco_weights}"]).model, num_keypoints=5)
    for name, tensor in start.state_dict().items():
        if name in KEYPOINT_PREDICTOR:
            assert tensor.shape[0 if name.endswith("bias") else 1] == 5, name
        else:
            assert torch.equal(tensor, source[name]), f"{name} was not loaded from the 17-keypoint model"

    out = tmp_path / "finetune"
    result = check(train_here(["--config", str(TINY_CONFIG), *tiny_overrides(
        five_keypoint_root, out, f"model.weights={coco_weights}", "train.max_steps=2", "data.min_visible_keypoints=1",
        "eval.max_images=4", FIVE_SIGMAS, *QUICK)], capfd))
    log = result.stderr
    assert (f"weights from {coco_weights}: {len(source) - 2} tensors loaded, 2 copied by joint name, "
            "0 re-initialised, 0 unused") in log
    by_name = re.findall(r"by joint name   (\S+)  model (\(.*?\)), file (\(.*?\))", log)
    assert by_name == [
        ("roi_heads.keypoint_predictor.kps_score_lowres.weight", "(64, 5, 4, 4)", "(64, 17, 4, 4)"),
        ("roi_heads.keypoint_predictor.kps_score_lowres.bias", "(5,)", "(17,)"),
    ]
    assert "keypoint predictor: copied by name: nose, left_shoulder, right_shoulder, left_hip, right_hip\n" in log
    assert "keypoint predictor: initialised: none\n" in log
    assert "horizontal flip pairs (inferred from names): left_shoulder<->right_shoulder, left_hip<->right_hip" in log
    assert "training finished at step 2" in log
    metrics = json.loads((out / "eval" / "00000002" / "metrics.json").read_text())
    assert "kp/AP" in metrics and "bbox/AP" in metrics
    final = torch.load(out / "model_final.pt", map_location="cpu", weights_only=True)
    assert final["keypoints"]["keypoint_names"] == FIVE_KEYPOINTS
    assert final["model"]["roi_heads.keypoint_predictor.kps_score_lowres.weight"].shape == (64, 5, 4, 4)


def start_model(weights: Path | str, names: list[str], seed: int = 1) -> dict[str, torch.Tensor]:
    """The state a fine-tuning run on the `names` skeleton starts from (build_model as train calls it), and the
    same model freshly initialised under the same seed: what a re-initialised keypoint predictor holds."""
    cfg = load_config(TINY_CONFIG, [f"model.weights={weights}"]).model
    torch.manual_seed(seed)
    return build_model(cfg, len(names), keypoint_names=names).state_dict()


def fresh_model(names: list[str], seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model(load_config(TINY_CONFIG).model, len(names)).state_dict()


def rows(state: dict[str, torch.Tensor], columns: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The keypoint predictor's deconvolution weights and biases of these joints (keypoints are dim 1 of the weight)."""
    return state[LOGITS][:, columns], state[BIAS][columns]


def assert_rows_equal(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_five_keypoint_model_starts_with_the_seventeen_keypoint_models_rows_of_its_joints(
        coco_weights: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = torch.load(coco_weights, map_location="cpu", weights_only=True)
    assert source["keypoints"]["keypoint_names"] == COCO_KEYPOINT_NAMES  # model_final.pt records its joints
    with caplog.at_level(logging.INFO, logger="dist_kp.model.keypoint_rcnn"):
        start = start_model(coco_weights, FIVE_KEYPOINTS)
    coco_rows = [COCO_KEYPOINT_NAMES.index(name) for name in FIVE_KEYPOINTS]
    assert coco_rows == [0, 5, 6, 11, 12]
    assert_rows_equal(rows(start, list(range(5))), rows(source["model"], coco_rows))
    assert all(torch.equal(tensor, source["model"][name]) for name, tensor in start.items()
               if name not in (LOGITS, BIAS))
    assert "keypoint predictor: copied by name: nose, left_shoulder, right_shoulder, left_hip, right_hip" in caplog.text
    assert "keypoint predictor: initialised: none" in caplog.text
    assert "reordered" not in caplog.text
    # Flip pairs follow the names: a flip swaps each copied row with the row of its source mirror.
    five_flip = flip_permutation(FIVE_KEYPOINTS, infer_flip_pairs(FIVE_KEYPOINTS)[0])
    coco_flip = flip_permutation(COCO_KEYPOINT_NAMES, infer_flip_pairs(COCO_KEYPOINT_NAMES)[0])
    assert five_flip == [0, 2, 1, 4, 3]
    assert [coco_rows[five_flip[i]] for i in range(5)] == [coco_flip[row] for row in coco_rows]


def test_joints_the_file_does_not_name_are_initialised_as_torchvision_initialises_them(
        coco_weights: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = torch.load(coco_weights, map_location="cpu", weights_only=True)["model"]
    names = ["right_hip", "tail", "nose"]
    with caplog.at_level(logging.INFO, logger="dist_kp.model.keypoint_rcnn"):
        start = start_model(coco_weights, names)
    assert_rows_equal(rows(start, [0, 2]), rows(source, [12, 0]))
    assert_rows_equal(rows(start, [1]), rows(fresh_model(names), [1]))
    assert rows(start, [1])[1].eq(0).all()  # torchvision's initialisation: kaiming normal weights, zero bias
    assert "keypoint predictor: copied by name, reordered from the file's order: right_hip, nose" in caplog.text
    assert "keypoint predictor: initialised: tail" in caplog.text


def test_the_same_joints_in_another_order_are_reordered_by_name(coco_weights: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    source = torch.load(coco_weights, map_location="cpu", weights_only=True)["model"]
    reversed_names = COCO_KEYPOINT_NAMES[::-1]
    with caplog.at_level(logging.INFO, logger="dist_kp.model.keypoint_rcnn"):
        start = start_model(coco_weights, reversed_names)
    assert_rows_equal(rows(start, list(range(17))), rows(source, list(range(17))[::-1]))
    assert f"keypoint predictor: copied by name, reordered from the file's order: {', '.join(reversed_names)}" \
        in caplog.text
    assert "2 copied by joint name, 0 re-initialised" in caplog.text


def test_a_skeleton_with_no_joint_name_in_common_loads_as_before_and_says_so(
        coco_weights: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = torch.load(coco_weights, map_location="cpu", weights_only=True)["model"]
    with caplog.at_level(logging.INFO, logger="dist_kp.model.keypoint_rcnn"):
        other = start_model(coco_weights, ["tail", "wing"])
    assert_rows_equal(rows(other, [0, 1]), rows(fresh_model(["tail", "wing"]), [0, 1]))
    assert ("keypoint predictor: no joint name in common (file: nose, left_eye, right_eye, left_ear, right_ear, "
            "left_shoulder, right_shoulder, left_elbow, right_elbow, left_wrist, right_wrist, left_hip, right_hip, "
            "left_knee, right_knee, left_ankle, right_ankle; this model: tail, wing): re-initialised") in caplog.text
    assert "re-initialised  roi_heads.keypoint_predictor.kps_score_lowres.weight  model (64, 2, 4, 4)" in caplog.text
    caplog.clear()
    # As many joints, none of the same name: the tensors fit, and load by position as they always did.
    numbered = [f"joint_{i}" for i in range(17)]
    with caplog.at_level(logging.INFO, logger="dist_kp.model.keypoint_rcnn"):
        by_position = start_model(coco_weights, numbered)
    assert_rows_equal(rows(by_position, list(range(17))), rows(source, list(range(17))))
    assert "this model: joint_0, " in caplog.text and "): loaded by position, as the shapes match" in caplog.text


def test_a_bare_state_dict_names_no_joints_and_its_keypoint_predictor_loads_by_shape(
        coco_weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(coco_weights, map_location="cpu", weights_only=True)["model"], bare)
    with caplog.at_level(logging.INFO, logger="dist_kp.model.keypoint_rcnn"):
        start = start_model(bare, FIVE_KEYPOINTS)
    assert_rows_equal(rows(start, list(range(5))), rows(fresh_model(FIVE_KEYPOINTS), list(range(5))))
    assert "2 re-initialised" in caplog.text and "keypoint predictor:" not in caplog.text


def test_torchvision_coco_weights_give_the_rows_of_cocos_joint_names(
        offline_torch_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    # torchvision's file is a bare state dict; the names are the weights enum's meta (COCO's 17).
    cached = offline_torch_home / "hub" / "checkpoints" / "keypointrcnn_resnet50_fpn_coco-fc266e95.pth"
    cached.parent.mkdir(parents=True)
    torch.manual_seed(2)
    coco = build_model(load_config(TINY_CONFIG).model, 17).state_dict()
    torch.save(coco, cached)
    with caplog.at_level(logging.INFO, logger="dist_kp.model.keypoint_rcnn"):
        start = start_model("KeypointRCNN_ResNet50_FPN_Weights.COCO_V1", ["left_hip", "right_hip", "tail"])
    assert_rows_equal(rows(start, [0, 1]), rows(coco, [11, 12]))
    assert "keypoint predictor: copied by name: left_hip, right_hip" in caplog.text
    assert "keypoint predictor: initialised: tail" in caplog.text


def test_as_many_names_as_keypoints_are_needed() -> None:
    with pytest.raises(ValueError, match=r"5 keypoints, but 2 keypoint names: \['nose', 'tail'\]"):
        build_model(load_config(TINY_CONFIG).model, 5, keypoint_names=["nose", "tail"])


def test_weights_of_another_architecture_are_refused_not_half_loaded(coco_weights: Path) -> None:
    cfg = load_config(TINY_CONFIG, [f"model.weights={coco_weights}", "model.backbone=mobilenet_v3_large",
                                    "model.backbone_stages=4"]).model
    # The file's own model config says it at once ...
    with pytest.raises(WeightsError, match=r"were written for another architecture \(model.backbone: file "
                                           r"'resnet18', this run 'mobilenet_v3_large'; model.backbone_stages: "
                                           r"file 3, this run 4\)"):
        build_model(cfg, num_keypoints=5)
    # ... and opting in to another architecture still never half-loads a model.
    with pytest.raises(WeightsError, match=r"are not weights of this model: only \d+ of \d+ tensors \(\d+% of the "
                                           r"values\) match by name and shape"):
        build_model(cfg.model_copy(update={"weights_any_architecture": True}), num_keypoints=5)


def test_strict_weights_refuse_another_skeleton(coco_weights: Path) -> None:
    cfg = load_config(TINY_CONFIG, [f"model.weights={coco_weights}", "model.weights_strict=true"]).model
    with pytest.raises(WeightsError, match="size mismatch for roi_heads.keypoint_predictor.kps_score_lowres.weight"):
        build_model(cfg, num_keypoints=5)


def test_the_finetune_config_is_valid_and_names_one_sigma_per_keypoint_of_its_skeleton() -> None:
    cfg = load_config("finetune_custom_skeleton")
    assert cfg.model.weights == "KeypointRCNN_ResNet50_FPN_Weights.COCO_V1" and not cfg.model.weights_strict
    assert len(cfg.eval.sigmas) == len(FIVE_KEYPOINTS)
