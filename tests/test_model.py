"""Model builder and learning-rate schedule."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torchvision

from dist_kp.config import ModelConfig, ScheduleConfig, load_config
from dist_kp.engine.schedule import lr_factor
from dist_kp.model.keypoint_rcnn import WeightsError, build_model, load_weights, weights_payload
from tests.conftest import TINY_CONFIG


def test_default_model_is_torchvision_keypointrcnn_resnet50_fpn() -> None:
    ours = build_model(ModelConfig(), num_keypoints=17)
    reference = torchvision.models.detection.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in reference.named_parameters() if p.requires_grad]
    assert ours.transform.min_size == reference.transform.min_size
    assert ours.transform.max_size == reference.transform.max_size
    assert ours.rpn.anchor_generator.sizes == reference.rpn.anchor_generator.sizes
    assert ours.rpn.anchor_generator.aspect_ratios == reference.rpn.anchor_generator.aspect_ratios


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_small_backbones_train_and_predict(backbone: str) -> None:
    cfg = load_config(TINY_CONFIG, [f"model.backbone={backbone}", "model.backbone_stages=4"]).model
    model = build_model(cfg, num_keypoints=5)
    images = [torch.rand(3, 120, 160), torch.rand(3, 160, 120)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 80.0, 100.0]]), "labels": torch.tensor([1]),
                "keypoints": torch.cat([torch.rand(1, 5, 2) * 60 + 15, torch.full((1, 5, 1), 2.0)], -1)}] * 2
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_keypoint"}
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out[0]["keypoints"].shape[1:] == (5, 3)


def body_stages(model: torch.nn.Module, trainable: bool = False) -> set[str]:
    return {n.split(".")[2] for n, p in model.named_parameters()
            if n.startswith("backbone.body") and (p.requires_grad or not trainable)}


def test_frozen_backbone_layers_do_not_train() -> None:
    cfg = load_config(TINY_CONFIG, ["model.backbone_stages=4", "model.trainable_backbone_layers=2"]).model
    assert body_stages(build_model(cfg, num_keypoints=17), trainable=True) == {"layer3", "layer4"}


def test_fewer_backbone_stages_leave_out_the_deepest_and_train_from_the_deepest_built_one() -> None:
    cfg = load_config(TINY_CONFIG, ["model.backbone_stages=3", "model.trainable_backbone_layers=2"]).model
    model = build_model(cfg, num_keypoints=5)
    assert body_stages(model) == {"conv1", "bn1", "layer1", "layer2", "layer3"}
    assert body_stages(model, trainable=True) == {"layer2", "layer3"}
    assert model.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,))  # three stages and the pool level
    everything = build_model(cfg.model_copy(update={"trainable_backbone_layers": 5}), num_keypoints=5)
    assert body_stages(everything, trainable=True) == body_stages(everything)
    person = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 90.0]]), "labels": torch.tensor([1]),
              "keypoints": torch.tensor([[[20.0, 30.0, 2.0]] * 5])}
    losses = model([torch.rand(3, 96, 128)], [person])
    sum(losses.values()).backward()
    with pytest.raises(ValueError, match=r"model.backbone_stages: .*ResNet backbones only"):
        load_config(TINY_CONFIG, ["model.backbone=mobilenet_v3_large", "model.backbone_stages=3"])


def test_strict_weights_load_exactly_and_a_mismatch_names_the_keys(tmp_path: Path) -> None:
    cfg = load_config(TINY_CONFIG, ["model.weights_strict=true"]).model
    source = build_model(cfg, num_keypoints=17)
    path = tmp_path / "w.pt"
    torch.save({"model": source.state_dict()}, path)
    loaded = build_model(cfg.model_copy(update={"weights": str(path)}), num_keypoints=17)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(WeightsError, match="w.pt"):
        build_model(cfg.model_copy(update={"weights": str(path)}), num_keypoints=5)
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("roi_heads.keypoint_predictor")}
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, path)
    with pytest.raises(WeightsError, match=r"missing keys \['roi_heads.keypoint_predictor.*unexpected keys \['extra.weight'\]"):
        load_weights(source, str(path), strict=True)


KEYPOINT_PREDICTOR = {"roi_heads.keypoint_predictor.kps_score_lowres.weight",
                      "roi_heads.keypoint_predictor.kps_score_lowres.bias"}


def test_weights_of_another_skeleton_load_every_matching_tensor_and_reinitialise_the_keypoint_predictor(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(TINY_CONFIG).model
    source = build_model(cfg, num_keypoints=17).state_dict()
    path = tmp_path / "w.pt"
    torch.save({"model": source}, path)
    torch.manual_seed(1)
    fresh = build_model(cfg, num_keypoints=5).state_dict()
    torch.manual_seed(1)  # the same initialisation, then the weights
    with caplog.at_level(logging.INFO, logger="dist_kp.model.keypoint_rcnn"):
        model = build_model(cfg.model_copy(update={"weights": str(path)}), num_keypoints=5)
    state = model.state_dict()
    for name, tensor in state.items():
        expected = fresh[name] if name in KEYPOINT_PREDICTOR else source[name]
        assert torch.equal(tensor, expected), name
    table = caplog.text
    assert f"{len(state) - 2} tensors loaded, 2 re-initialised, 0 unused" in table
    assert "re-initialised  roi_heads.keypoint_predictor.kps_score_lowres.weight  model (64, 5, 4, 4), " \
           "file (64, 17, 4, 4)" in table
    assert "loaded          backbone.body  (" in table


def test_a_box_predictor_for_another_class_count_is_reinitialised_and_extra_tensors_are_listed_unused(
        tmp_path: Path) -> None:
    cfg = load_config(TINY_CONFIG).model
    source = build_model(cfg, num_keypoints=17).state_dict()
    source["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(91, cfg.box_head_dim)
    source["roi_heads.box_predictor.cls_score.bias"] = torch.zeros(91)
    source["roi_heads.mask_head.weight"] = torch.zeros(3)
    path = tmp_path / "w.pt"
    torch.save(source, path)
    report = load_weights(build_model(cfg, num_keypoints=17), str(path))
    assert report.reinitialised == {"roi_heads.box_predictor.cls_score.weight": ((2, 128), (91, 128)),
                                    "roi_heads.box_predictor.cls_score.bias": ((2,), (91,))}
    assert report.unused == {"roi_heads.mask_head.weight": (3,)}
    assert "roi_heads.box_predictor.bbox_pred.weight" in report.loaded


def test_weights_of_another_architecture_are_refused_with_the_counts(tmp_path: Path) -> None:
    cfg = load_config(TINY_CONFIG).model
    path = tmp_path / "mobilenet.pt"
    torch.save({"model": build_model(cfg.model_copy(update={"backbone": "mobilenet_v3_large"}), 17).state_dict()},
               path)
    with pytest.raises(WeightsError, match=r"mobilenet.pt are not weights of this model: only \d+ of \d+ tensors"):
        build_model(cfg.model_copy(update={"weights": str(path)}), num_keypoints=17)


@pytest.fixture
def offline_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TORCH_HOME, and torch.hub's downloaders replaced by failures: no test reaches the network."""
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)  # WeightsEnum's own
    return tmp_path / "torch_home"


def test_torchvision_weights_by_name_load_from_the_torch_home_cache_without_network(
        offline_torch_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    cached = offline_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    imagenet = torchvision.models.resnet18(weights=None).state_dict()  # torchvision's format: a bare state dict
    torch.save(imagenet, cached)
    cfg = load_config(TINY_CONFIG, ["model.backbone_weights=ResNet18_Weights.IMAGENET1K_V1"]).model
    with caplog.at_level(logging.WARNING, logger="dist_kp.model.keypoint_rcnn"):
        model = build_model(cfg, num_keypoints=17)
    body = model.backbone.body.state_dict()
    assert body and all(torch.equal(tensor, imagenet[name]) for name, tensor in body.items())
    assert "does not start with f37072fd" in caplog.text  # the test's file is not torchvision's


def test_a_missing_torchvision_weights_file_says_where_to_put_it_and_how_to_fetch_it(
        offline_torch_home: Path) -> None:
    cfg = load_config(TINY_CONFIG, ["model.weights=KeypointRCNN_ResNet50_FPN_Weights.DEFAULT"]).model
    with pytest.raises(WeightsError) as error:
        build_model(cfg, num_keypoints=17)
    message = str(error.value)
    expected = offline_torch_home / "hub" / "checkpoints" / "keypointrcnn_resnet50_fpn_coco-fc266e95.pth"
    assert f"at {expected}" in message
    assert "sha256 starting fc266e95" in message
    assert "curl -L -o keypointrcnn_resnet50_fpn_coco-fc266e95.pth " \
           "https://download.pytorch.org/models/keypointrcnn_resnet50_fpn_coco-fc266e95.pth" in message
    assert "model.weights" in message


def test_a_missing_torchvision_backbone_file_says_to_give_it_as_model_backbone_weights(
        offline_torch_home: Path) -> None:
    cfg = load_config(TINY_CONFIG, ["model.backbone_weights=ResNet18_Weights.IMAGENET1K_V1"]).model
    with pytest.raises(WeightsError) as error:
        build_model(cfg, num_keypoints=17)
    message = str(error.value)
    assert message.startswith("model.backbone_weights: torchvision weights ResNet18_Weights.IMAGENET1K_V1 are not")
    assert "model.backbone_weights=s3://bucket/weights/resnet18-f37072fd.pth" in message
    assert "model.weights" not in message  # a backbone file given as model.weights matches 0 of the model's tensors


def test_an_unknown_torchvision_weights_name_is_named(offline_torch_home: Path) -> None:
    with pytest.raises(WeightsError, match="unknown torchvision weights name 'ResNet18_Weights.NOPE'"):
        load_weights(torch.nn.Linear(1, 1), "ResNet18_Weights.NOPE")


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found.*nope.pt"):
        load_weights(torch.nn.Linear(1, 1), str(tmp_path / "nope.pt"))


def test_schedule_warms_up_linearly_then_steps_at_milestones() -> None:
    schedule = ScheduleConfig(milestones=[2, 3], gamma=0.1, warmup_iters=10, warmup_factor=0.001)
    assert lr_factor(0, schedule, steps_per_epoch=20, total_steps=80) == pytest.approx(0.001)
    assert lr_factor(5, schedule, 20, 80) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(10, schedule, 20, 80) == 1.0
    assert lr_factor(39, schedule, 20, 80) == 1.0
    assert lr_factor(40, schedule, 20, 80) == pytest.approx(0.1)
    assert lr_factor(60, schedule, 20, 80) == pytest.approx(0.01)


def test_cosine_schedule_decays_to_zero() -> None:
    schedule = ScheduleConfig(name="cosine", warmup_iters=0)
    assert lr_factor(0, schedule, 10, 100) == 1.0
    assert lr_factor(50, schedule, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, schedule, 10, 100) == pytest.approx(0.0, abs=1e-12)
    assert math.isclose(lr_factor(25, schedule, 10, 100), 0.5 * (1 + math.cos(math.pi / 4)))


def test_a_dist_kp_weights_file_of_another_architecture_is_refused_naming_the_keys_unless_opted_in(
        tmp_path: Path) -> None:
    """A resnet50 model_final.pt fills 57% of a resnet18 model by name and shape: without its model
    config it would load silently."""
    cfg = load_config(TINY_CONFIG).model
    written_with = cfg.model_copy(update={"backbone": "resnet50"})
    path = tmp_path / "model_final.pt"
    torch.save(weights_payload(build_model(written_with, 17), written_with, {}), path)
    with pytest.raises(WeightsError) as refused:
        build_model(cfg.model_copy(update={"weights": str(path)}), num_keypoints=17)
    message = str(refused.value)
    assert "model.backbone: file 'resnet50', this run 'resnet18'" in message
    assert "model.weights_any_architecture=true" in message
    assert "fpn_channels" not in message  # only the keys that differ

    opted_in = cfg.model_copy(update={"weights": str(path), "weights_any_architecture": True})
    report = load_weights(build_model(cfg, 17), str(path), architecture=opted_in)
    assert report.loaded and report.reinitialised  # the FPN and heads match, the backbone's deeper blocks not


def test_another_keypoint_count_is_not_another_architecture(tmp_path: Path) -> None:
    cfg = load_config(TINY_CONFIG).model
    path = tmp_path / "model_final.pt"
    torch.save(weights_payload(build_model(cfg, 17), cfg, {}), path)
    report = load_weights(build_model(cfg, 5), str(path), architecture=cfg)
    assert set(report.reinitialised) == KEYPOINT_PREDICTOR


class RunsCode:
    def __reduce__(self):
        return (print, ("this ran when the file was loaded",))


def test_a_weights_file_that_runs_code_is_refused_without_advice_to_load_it_anyway(tmp_path: Path) -> None:
    path = tmp_path / "model_final.pt"
    torch.save({"model": {"w": RunsCode()}}, path)
    cfg = load_config(TINY_CONFIG).model
    with pytest.raises(WeightsError) as refused:
        build_model(cfg.model_copy(update={"weights": str(path)}), num_keypoints=17)
    message = str(refused.value)
    assert str(path) in message and "it loads print" in message
    assert "weights_only" not in message and "trust" not in message
