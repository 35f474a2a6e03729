"""Model builder and learning-rate schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision

from dist_kp.config import ModelConfig, ScheduleConfig, load_config
from dist_kp.engine import lr_factor
from dist_kp.model import WeightsError, build_model, load_weights
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


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_small_backbones_train_and_predict(backbone: str) -> None:
    cfg = load_config(TINY_CONFIG, [f"model.backbone={backbone}"]).model
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


def test_frozen_backbone_layers_do_not_train() -> None:
    cfg = load_config(TINY_CONFIG, ["model.trainable_backbone_layers=2"]).model
    model = build_model(cfg, num_keypoints=17)
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.body")}
    assert trainable == {"layer3", "layer4"}


def test_weights_from_a_file_load_and_a_mismatch_names_the_keys(tmp_path: Path) -> None:
    cfg = load_config(TINY_CONFIG).model
    source = build_model(cfg, num_keypoints=17)
    path = tmp_path / "w.pt"
    torch.save({"model": source.state_dict()}, path)
    loaded = build_model(cfg.model_copy(update={"weights": str(path)}), num_keypoints=17)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    other = build_model(cfg, num_keypoints=5)
    with pytest.raises(WeightsError) as error:
        load_weights(other, str(path))
    assert "w.pt" in str(error.value)
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("roi_heads.keypoint_predictor")}
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, path)
    with pytest.raises(WeightsError, match=r"missing keys \['roi_heads.keypoint_predictor.*unexpected keys \['extra.weight'\]"):
        load_weights(source, str(path))


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
