"""Keypoint R-CNN built from the model config.

The defaults build exactly torchvision's keypointrcnn_resnet50_fpn; the options shrink it
(backbone, FPN width, head sizes, sample counts, image size) down to the tiny CPU config.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection import KeypointRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from dist_kp import storage
from dist_kp.config import ModelConfig

log = logging.getLogger(__name__)


class WeightsError(ValueError):
    """Weights that cannot be loaded into the model; the message names the source and the keys."""


def _read_state_dict(source: str) -> dict[str, torch.Tensor]:
    """A state dict from a torchvision weights name, a local path or an fsspec URL."""
    if "_Weights." in source and "/" not in source:
        try:
            return torchvision.models.get_weight(source).get_state_dict(progress=False)
        except (KeyError, ValueError) as error:
            raise WeightsError(f"unknown torchvision weights name {source!r}: {error}") from None
    try:
        with storage.open_url(source, "rb") as f:
            loaded = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {source}") from None
    except Exception as error:
        raise WeightsError(f"cannot load weights from {source}: {error}") from error
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]  # a dist_kp weights file or checkpoint
    if not isinstance(loaded, dict):
        raise WeightsError(f"{source} does not hold a state dict (got {type(loaded).__name__})")
    return loaded


def load_weights(module: nn.Module, source: str) -> None:
    """Load a state dict strictly; a mismatch names the missing and unexpected keys."""
    state = _read_state_dict(source)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches raise even when strict=False
        raise WeightsError(f"weights {source} do not fit the model: {error}") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"weights {source} do not fit the model: missing keys {result.missing_keys[:10]}"
            f"{' ...' if len(result.missing_keys) > 10 else ''}, unexpected keys {result.unexpected_keys[:10]}"
            f"{' ...' if len(result.unexpected_keys) > 10 else ''}"
        )
    log.info("loaded weights from %s", source)


def _norm_layer(cfg: ModelConfig) -> type[nn.Module]:
    if cfg.norm_layer == "auto":
        return FrozenBatchNorm2d if cfg.backbone_weights or cfg.weights else nn.BatchNorm2d
    return FrozenBatchNorm2d if cfg.norm_layer == "frozen_bn" else nn.BatchNorm2d


def _trainable_layers(cfg: ModelConfig) -> int:
    # As torchvision: without any pretrained weights every backbone stage trains.
    if cfg.trainable_backbone_layers is None:
        return 3 if cfg.backbone_weights or cfg.weights else 5
    return cfg.trainable_backbone_layers


def _resnet_backbone(cfg: ModelConfig, norm_layer: type[nn.Module]) -> tuple[BackboneWithFPN, int]:
    resnet = getattr(torchvision.models, cfg.backbone)(weights=None, norm_layer=norm_layer)
    if cfg.backbone_weights:
        load_weights(resnet, cfg.backbone_weights)
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: _trainable_layers(cfg)]
    if _trainable_layers(cfg) == 5:
        trainable.append("bn1")
    for name, parameter in resnet.named_parameters():
        if all(not name.startswith(layer) for layer in trainable):
            parameter.requires_grad_(False)
    stage_channels = resnet.inplanes // 8
    in_channels = [stage_channels * 2**i for i in range(4)]
    return_layers = {f"layer{i + 1}": str(i) for i in range(4)}
    return BackboneWithFPN(resnet, return_layers, in_channels, cfg.fpn_channels, extra_blocks=LastLevelMaxPool()), 4


def _mobilenet_backbone(cfg: ModelConfig, norm_layer: type[nn.Module]) -> tuple[BackboneWithFPN, int]:
    mobilenet = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm_layer)
    if cfg.backbone_weights:
        load_weights(mobilenet, cfg.backbone_weights)
    features = mobilenet.features
    stages = [0] + [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)] + [len(features) - 1]
    freeze_before = stages[len(stages) - _trainable_layers(cfg)] if _trainable_layers(cfg) < len(stages) else 0
    for block in features[:freeze_before]:
        for parameter in block.parameters():
            parameter.requires_grad_(False)
    returned = [stages[-2], len(features) - 1]
    return_layers = {str(i): str(n) for n, i in enumerate(returned)}
    in_channels = [features[stages[-2]].out_channels, features[-1].out_channels]
    fpn = BackboneWithFPN(features, return_layers, in_channels, cfg.fpn_channels, extra_blocks=LastLevelMaxPool())
    return fpn, 2


def build_model(cfg: ModelConfig, num_keypoints: int) -> KeypointRCNN:
    """Keypoint R-CNN for one 'person' class with `num_keypoints` keypoints."""
    norm_layer = _norm_layer(cfg)
    if cfg.backbone == "mobilenet_v3_large":
        backbone, levels = _mobilenet_backbone(cfg, norm_layer)
        anchor_generator = AnchorGenerator(((32, 64, 128, 256, 512),) * (levels + 1), ((0.5, 1.0, 2.0),) * (levels + 1))
    else:
        backbone, levels = _resnet_backbone(cfg, norm_layer)
        anchor_generator = None  # torchvision's default for five FPN levels
    names = [str(i) for i in range(levels)]
    channels = cfg.fpn_channels
    model = KeypointRCNN(
        backbone,
        min_size=tuple(cfg.min_size),
        max_size=cfg.max_size,
        rpn_anchor_generator=anchor_generator,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(channels * 7 * 7, cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, 2),
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_detections_per_img=cfg.box_detections_per_img,
        keypoint_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2),
        keypoint_head=KeypointRCNNHeads(channels, [cfg.keypoint_head_channels] * cfg.keypoint_head_layers),
        keypoint_predictor=KeypointRCNNPredictor(cfg.keypoint_head_channels, num_keypoints),
    )
    if cfg.weights:
        load_weights(model, cfg.weights)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def weights_payload(model: nn.Module, model_cfg: ModelConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """What an inference weights file holds: the state dict plus what predict needs to rebuild it."""
    state = OrderedDict((k, v.detach().cpu()) for k, v in unwrap(model).state_dict().items())
    return {"model": state, "model_config": model_cfg.model_dump(mode="json"), "keypoints": meta}
