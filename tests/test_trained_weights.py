"""evaluate, predict and export build the model from its weights file: the model config the file records, every
tensor from the file. A training checkpoint is a weights file too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from dist_kp.config import load_config
from dist_kp.data.synthetic import COCO_KEYPOINT_NAMES, COCO_SKELETON
from dist_kp.evaluate import main as evaluate_main
from dist_kp.export import main as export_main
from dist_kp.model.keypoint_rcnn import build_model, read_weights_file, weights_payload
from dist_kp.model.trained import trained_model
from dist_kp.predict import main as predict_main
from tests.conftest import REPO, TINY_CONFIG, tiny_overrides, train_for_fixture
from tests.test_model import offline_torch_home  # noqa: F401 - the fixture: an empty hub cache, downloads refused

COCO_CONFIG = REPO / "configs" / "coco_kp_r50_fpn.yaml"
# The COCO recipe's network with small heads and pictures, so that it evaluates in seconds on a CPU.
SMALL_HEADS = ["model.fpn_channels=32", "model.box_head_dim=128", "model.keypoint_head_layers=2",
               "model.keypoint_head_channels=64", "model.min_size=[128]", "model.max_size=192",
               "model.rpn_pre_nms_top_n_test=200", "model.rpn_post_nms_top_n_test=50", "model.box_detections_per_img=20"]
COCO_KEYPOINTS = {"category_id": 1, "keypoint_names": COCO_KEYPOINT_NAMES, "skeleton": COCO_SKELETON}



@pytest.fixture(scope="module")
def coco_recipe_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model_final.pt as training with the COCO config writes it: ResNet-50 started from ImageNet weights (frozen
    BN), the model config naming that backbone file."""
    written_with = load_config(COCO_CONFIG, SMALL_HEADS).model
    assert written_with.backbone_weights == "ResNet50_Weights.IMAGENET1K_V1"
    torch.manual_seed(0)
    model = build_model(written_with.model_copy(update={"backbone_weights": None, "norm_layer": "frozen_bn"}), 17)
    path = tmp_path_factory.mktemp("coco_recipe") / "model_final.pt"
    torch.save(weights_payload(model, written_with, COCO_KEYPOINTS), path)
    return path


@pytest.fixture(scope="module")
def run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained in this process for two steps: model_final.pt and the checkpoint of step 2."""
    out = tmp_path_factory.mktemp("two_steps")
    train_for_fixture(["--config", str(TINY_CONFIG), *tiny_overrides(
        synthetic_root, out, "train.max_steps=2", "train.workers=0", "eval.every_epochs=0", "eval.at_end=false",
        "checkpoint.every_steps=2")])
    return out


def evaluate(config: Path, weights: Path | str, root: Path, out: Path, *overrides: str) -> int:
    return evaluate_main(["--config", str(config), "--weights", str(weights), f"data.root={root}", f"output_dir={out}",
                          "train.workers=0", "train.device=cpu", "eval.max_images=2", *overrides])


def predict(weights: Path | str, image: Path, out: Path) -> int:
    return predict_main(["--weights", str(weights), "--images", str(image), "--out", str(out), "--device", "cpu",
                         "--score-threshold", "0"])


def test_evaluate_with_the_coco_config_reads_no_backbone_file_for_a_model_trained_with_it(
        coco_recipe_weights: Path, synthetic_root: Path, tmp_path: Path, offline_torch_home: Path,
        capfd: pytest.CaptureFixture) -> None:
    assert evaluate(COCO_CONFIG, coco_recipe_weights, synthetic_root, tmp_path / "eval") == 0, capfd.readouterr().err
    assert {"kp/AP", "bbox/AP"} <= json.loads((tmp_path / "eval/eval/00000000/metrics.json").read_text()).keys()
    assert "not used from the config: model.backbone_weights" in capfd.readouterr().err

    # The network is the file's (frozen BN, as trained), every tensor from the file.
    model = trained_model(read_weights_file(str(coco_recipe_weights)), load_config(COCO_CONFIG).model).model
    saved = torch.load(coco_recipe_weights, weights_only=True)["model"]
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in model.state_dict().items())
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)


def test_a_config_model_key_that_changes_the_network_is_refused_naming_the_key_and_both_values(
        run: Path, synthetic_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    assert evaluate(TINY_CONFIG, run / "model_final.pt", synthetic_root, tmp_path / "wide",
                    "model.fpn_channels=64", "model.min_size=[112]") == 2
    err = capfd.readouterr().err
    assert "model.fpn_channels: weights file 32, --config 64" in err
    assert "model.min_size: weights file [96], --config [112]" in err
    assert not (tmp_path / "wide/eval").exists()


def test_model_keys_that_do_not_change_the_network_are_not_used(
        run: Path, synthetic_root: Path, tmp_path: Path, offline_torch_home: Path,
        capfd: pytest.CaptureFixture) -> None:
    assert evaluate(TINY_CONFIG, run / "model_final.pt", synthetic_root, tmp_path / "eval",
                    "model.backbone_weights=ResNet18_Weights.IMAGENET1K_V1", "model.weights=/nowhere/coco.pt",
                    "model.trainable_backbone_layers=3", "model.rpn_batch_size_per_image=32") == 0
    err = capfd.readouterr().err
    assert ("not used from the config: model.backbone_weights, model.rpn_batch_size_per_image, "
            "model.trainable_backbone_layers, model.weights") in err


def test_a_checkpoint_is_a_weights_file_for_evaluate_predict_export_and_fine_tuning(
        run: Path, synthetic_root: Path, tmp_path: Path) -> None:
    checkpoint = run / "checkpoints" / "step_00000002"
    final = run / "model_final.pt"  # written at the same step: the same weights
    for name, weights in (("final", final), ("state", checkpoint / "state.pt")):
        assert evaluate(TINY_CONFIG, weights, synthetic_root, tmp_path / f"eval_{name}") == 0, name
    metrics = {name: json.loads((tmp_path / f"eval_{name}/eval/00000000/metrics.json").read_text())
               for name in ("final", "state")}
    assert metrics["final"] == metrics["state"]

    image = sorted((synthetic_root / "val2017").glob("*.jpg"))[0]
    for name, weights in (("final", final), ("folder", checkpoint), ("run", run)):  # a run folder: its model_final.pt
        assert predict(weights, image, tmp_path / f"predict_{name}") == 0, name
    results = {name: json.loads((tmp_path / f"predict_{name}/results.json").read_text())
               for name in ("final", "folder", "run")}
    assert results["final"] and results["final"] == results["folder"] == results["run"]

    assert export_main(["--weights", str(checkpoint / "state.pt"), "--out", str(tmp_path / "model.pt"),
                        "--format", "torchscript"]) == 0
    assert json.loads((tmp_path / "model.pt.json").read_text())["keypoints"]["names"] == COCO_KEYPOINT_NAMES

    cfg = load_config(TINY_CONFIG, [f"model.weights={checkpoint}", "model.weights_strict=true"]).model
    saved = torch.load(checkpoint / "state.pt", weights_only=True)["model"]
    fine_tuned = build_model(cfg, 17).state_dict()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in fine_tuned.items())


def test_a_checkpoint_without_keypoint_names_is_refused_by_predict_saying_why(
        run: Path, synthetic_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    state = torch.load(run / "checkpoints/step_00000002/state.pt", weights_only=True)
    del state["keypoints"]  # as checkpoints were written before they recorded them
    older = tmp_path / "step_00000002" / "state.pt"
    older.parent.mkdir()
    torch.save(state, older)
    image = sorted((synthetic_root / "val2017").glob("*.jpg"))[0]
    assert predict(older, image, tmp_path / "out") == 2
    err = capfd.readouterr().err
    assert f"{older} is a training checkpoint written before dist_kp recorded the keypoint names" in err
    assert evaluate(TINY_CONFIG, older.parent, synthetic_root, tmp_path / "eval") == 0, "evaluate needs no names"


def test_a_folder_that_is_neither_a_checkpoint_nor_a_finished_run_is_named(tmp_path: Path,
                                                                           capfd: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert predict(tmp_path / "empty", tmp_path, tmp_path / "out") == 2
    assert f"{tmp_path / 'empty'} is a folder with neither state.pt" in capfd.readouterr().err
