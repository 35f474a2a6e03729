"""A trained model rebuilt from its weights file, for evaluate, predict and export.

    file = read_weights_file("runs/r50/model_final.pt")      # or a checkpoint: .../checkpoints/step_N[/state.pt]
    model = trained_model(file, given=cfg.model, dataset_keypoints=names).model

The file says which network it holds: model_final.pt and model_best.pt record the model config
beside the state dict, a training checkpoint the run's whole config. The network is built from
that config and every tensor comes from the file, so no pretrained backbone or weights file named
in a config is read. A config given beside the file (evaluate's --config) supplies the data and
evaluation settings; a key of its model section that shapes the network or its outputs
(NETWORK_KEYS) set to another value than the file's is refused by name, and the other model keys
(where pretrained weights come from, what trains) do not matter here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydantic import ValidationError
from torchvision.models.detection import KeypointRCNN

from dist_kp.config import ModelConfig
from dist_kp.model.keypoint_rcnn import (
    ARCHITECTURE_KEYS,
    KEYPOINT_LOGITS,
    WeightsError,
    WeightsFile,
    build_model,
    load_state,
    resolved_norm_layer,
)

log = logging.getLogger(__name__)

# The model keys that change the network's tensors, or what it returns at inference.
NETWORK_KEYS = (*ARCHITECTURE_KEYS, "min_size", "max_size", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
                "box_detections_per_img")


@dataclass(frozen=True)
class TrainedModel:
    """The model in eval mode, the file it came from and the config it was built from."""

    model: KeypointRCNN
    file: WeightsFile
    config: ModelConfig


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` as its network was built (norm layer resolved), reading no weights: the file has every tensor."""
    return cfg.model_copy(update={"norm_layer": resolved_norm_layer(cfg), "weights": None, "backbone_weights": None})


def network_conflicts(given: ModelConfig, written: ModelConfig) -> list[str]:
    """'model.KEY: weights file X, --config Y' for each of NETWORK_KEYS that `given` sets (in its YAML or an
    override) to another value than the file's; keys left at their defaults are the file's."""
    return [f"model.{key}: weights file {getattr(written, key)!r}, --config {getattr(given, key)!r}"
            for key in NETWORK_KEYS if key in given.model_fields_set and getattr(given, key) != getattr(written, key)]


def keypoint_count(file: WeightsFile) -> int:
    """The number of keypoints the file's model predicts."""
    if file.keypoint_names is not None:
        return len(file.keypoint_names)
    # A bare state dict: the keypoint dimension of the logits, [channels, keypoints, 4, 4].
    logits = file.state.get(KEYPOINT_LOGITS)
    if logits is None or logits.dim() != 4:
        raise WeightsError(f"{file.source} holds no Keypoint R-CNN keypoint predictor ({KEYPOINT_LOGITS}): not the "
                           "weights of a whole model (backbone-only weights go to model.backbone_weights, in training)")
    return int(logits.shape[1])


def _written_config(file: WeightsFile) -> ModelConfig:
    try:
        return ModelConfig.model_validate(file.model_config)
    except ValidationError as error:
        raise WeightsError(f"{file.source}: the model config it records is unusable: {error}") from None


def _check_keypoints(file: WeightsFile, count: int, dataset_keypoints: list[str] | None) -> None:
    if dataset_keypoints is None:
        return
    if count != len(dataset_keypoints):
        raise WeightsError(f"{file.source} predicts {count} keypoints, the dataset has {len(dataset_keypoints)} "
                           f"({', '.join(dataset_keypoints)}): evaluate it on the dataset it was trained for")
    names = (file.keypoints or {}).get("keypoint_names")
    if names and list(names) != list(dataset_keypoints):
        log.warning("%s was trained on keypoints %s, the dataset names them %s: compared by position",
                    file.source, list(names), list(dataset_keypoints))


def trained_model(file: WeightsFile, given: ModelConfig | None = None,
                  dataset_keypoints: list[str] | None = None) -> TrainedModel:
    """The model of a weights file, in eval mode on the CPU.

    A dist_kp file (model_final.pt, model_best.pt, a checkpoint) is built from the model config it
    records and loaded exactly. given: the model section of a config beside the file; a NETWORK_KEYS
    value it sets that differs from the file's is refused naming each key and both values. A bare
    state dict (torchvision's, another tool's) records no config: it is built from `given`, which it
    needs, and loaded as model.weights is in training (model.weights_strict decides). dataset_keypoints:
    the keypoint names of the data it is run on; another count is refused.
    """
    count = keypoint_count(file)
    _check_keypoints(file, count, dataset_keypoints)
    if file.model_config is None:
        if given is None:
            raise WeightsError(f"{file.source} is not a dist_kp weights file: it records no model config")
        cfg = inference_config(given.model_copy(update={"weights": file.source}))
        model = build_model(cfg, count)
        load_state(model, file.state, file.source, given.weights_strict)
        return TrainedModel(model.eval(), file, cfg)
    cfg = inference_config(_written_config(file))
    if given is not None:
        conflicts = network_conflicts(given, cfg)
        if conflicts:
            raise WeightsError(
                f"the config's model section describes another network than {file.source}: {'; '.join(conflicts)}. "
                "The network is built from the model config the file records: drop these keys from the config "
                "(or the overrides), or set them to the file's values")
        unused = [key for key in sorted(given.model_fields_set - set(NETWORK_KEYS))
                  if getattr(given, key) != getattr(cfg, key)]
        if unused:
            log.info("not used from the config: %s (the network is built from the model config %s records, every "
                     "tensor from the file)", ", ".join(f"model.{key}" for key in unused), file.source)
    model = build_model(cfg, count)
    try:
        model.load_state_dict(file.state)
    except RuntimeError as error:
        raise WeightsError(f"{file.source}: the state dict does not fit its own model config: {error}") from None
    return TrainedModel(model.eval(), file, cfg)
