"""Fine-tuning on another skeleton: a 5-keypoint run starts from the model_final.pt of a 17-keypoint run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dist_kp.config import load_config
from dist_kp.model.keypoint_rcnn import WeightsError, build_model
from tests.conftest import TINY_CONFIG, check, run_module, tiny_overrides

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
        category = data["categories"][0]
        keep = [category["keypoints"].index(name) for name in names]
        new_number = {old + 1: new + 1 for new, old in enumerate(keep)}
        category["keypoints"] = names
        category["skeleton"] = [[new_number[a], new_number[b]] for a, b in category["skeleton"]
                                if a in new_number and b in new_number]
        for annotation in data["annotations"]:
            flat = annotation["keypoints"]
            annotation["keypoints"] = [value for k in keep for value in flat[3 * k:3 * k + 3]]
            annotation["num_keypoints"] = sum(1 for v in annotation["keypoints"][2::3] if v > 0)
        (out / "annotations" / f"person_keypoints_{split}2017.json").write_text(json.dumps(data))
    return out


@pytest.fixture(scope="module")
def coco_weights(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model_final.pt of a few steps of the tiny model on the 17-keypoint set."""
    out = tmp_path_factory.mktemp("coco_run")
    check(run_module("dist_kp.train", ["--config", str(TINY_CONFIG), *tiny_overrides(
        synthetic_root, out, "train.max_steps=3", "eval.at_end=false", *QUICK)]))
    return out / "model_final.pt"


@pytest.fixture(scope="module")
def five_keypoint_root(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return select_keypoints(synthetic_root, tmp_path_factory.mktemp("five") / "data", FIVE_KEYPOINTS)


def test_the_five_keypoint_set_is_a_valid_coco_set_with_mirrored_names(five_keypoint_root: Path) -> None:
    data = json.loads((five_keypoint_root / "annotations" / "person_keypoints_val2017.json").read_text())
    assert data["categories"][0]["keypoints"] == FIVE_KEYPOINTS
    assert data["categories"][0]["skeleton"] == [[4, 5], [2, 4], [3, 5], [2, 3]]  # COCO 12-13, 6-12, 7-13, 6-7
    assert all(len(a["keypoints"]) == 15 for a in data["annotations"])


def test_a_five_keypoint_run_loads_every_tensor_of_a_seventeen_keypoint_model_but_the_keypoint_predictor(
        coco_weights: Path, five_keypoint_root: Path, tmp_path: Path) -> None:
    source = torch.load(coco_weights, map_location="cpu", weights_only=True)["model"]
    # The model the fine-tuning run starts from, before its first step.
    start = build_model(load_config(TINY_CONFIG, [f"model.weights={coco_weights}"]).model, num_keypoints=5)
    for name, tensor in start.state_dict().items():
        if name in KEYPOINT_PREDICTOR:
            assert tensor.shape[0 if name.endswith("bias") else 1] == 5, name
        else:
            assert torch.equal(tensor, source[name]), f"{name} was not loaded from the 17-keypoint model"

    out = tmp_path / "finetune"
    result = check(run_module("dist_kp.train", ["--config", str(TINY_CONFIG), *tiny_overrides(
        five_keypoint_root, out, f"model.weights={coco_weights}", "train.max_steps=2", "data.min_visible_keypoints=1",
        "eval.max_images=4", FIVE_SIGMAS, *QUICK)]))
    log = result.stderr
    assert f"weights from {coco_weights}: {len(source) - 2} tensors loaded, 2 re-initialised, 0 unused" in log
    reinitialised = re.findall(r"re-initialised  (\S+)  model (\(.*?\)), file (\(.*?\))", log)
    assert reinitialised == [
        ("roi_heads.keypoint_predictor.kps_score_lowres.weight", "(64, 5, 4, 4)", "(64, 17, 4, 4)"),
        ("roi_heads.keypoint_predictor.kps_score_lowres.bias", "(5,)", "(17,)"),
    ]
    assert "training finished at step 2" in log
    metrics = json.loads((out / "eval" / "00000002" / "metrics.json").read_text())
    assert "kp/AP" in metrics and "bbox/AP" in metrics
    final = torch.load(out / "model_final.pt", map_location="cpu", weights_only=True)
    assert final["keypoints"]["keypoint_names"] == FIVE_KEYPOINTS
    assert final["model"]["roi_heads.keypoint_predictor.kps_score_lowres.weight"].shape == (64, 5, 4, 4)


def test_weights_of_another_architecture_are_refused_not_half_loaded(coco_weights: Path) -> None:
    cfg = load_config(TINY_CONFIG, [f"model.weights={coco_weights}", "model.backbone=mobilenet_v3_large"]).model
    # The file's own model config says it at once ...
    with pytest.raises(WeightsError, match=r"were written for another architecture \(model.backbone: file "
                                           r"'resnet18', this run 'mobilenet_v3_large'\)"):
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
