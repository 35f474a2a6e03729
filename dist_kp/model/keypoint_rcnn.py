"""Keypoint R-CNN built from the model config, and the weights it starts from.

The defaults build exactly torchvision's keypointrcnn_resnet50_fpn; the options shrink it
(backbone, FPN width, head sizes, sample counts, image size) down to the tiny CPU config.
Weights load by name and shape, so COCO weights start a model of another skeleton
(`model.weights_strict=true` refuses any difference); where the file names its joints (a dist_kp
model_final.pt, torchvision's COCO weights) the keypoint predictor's rows of the joints the new
skeleton shares are copied by joint name. torchvision weights names are read from torch's hub
cache and never downloaded.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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

from dist_kp import distributed
from dist_kp.config import ModelConfig
from dist_kp.model.errors import WeightsError
from dist_kp.storage import Storage
from dist_kp.storage.run_folder import CHECKPOINT_STATE, MODEL_FINAL
from dist_kp.storage.untrusted import load_untrusted

log = logging.getLogger(__name__)


# Fewer of the model's values than this found in a weights file (by name and shape): another architecture.
MIN_MATCHING_FRACTION = 0.5
# The model keys that shape the network's tensors; fine-tuning may change only the keypoint count and names.
ARCHITECTURE_KEYS = ("backbone", "backbone_stages", "fpn_channels", "box_head_dim", "keypoint_head_layers",
                     "keypoint_head_channels")
# The keypoint logits of Keypoint R-CNN (a ConvTranspose2d): weight [channels, keypoints, 4, 4], bias [keypoints].
KEYPOINT_LOGITS = "roi_heads.keypoint_predictor.kps_score_lowres.weight"
KEYPOINT_BIAS = "roi_heads.keypoint_predictor.kps_score_lowres.bias"
# The keypoint dimension of each keypoint predictor tensor.
KEYPOINT_DIM = {KEYPOINT_LOGITS: 1, KEYPOINT_BIAS: 0}


@dataclass(frozen=True)
class TorchvisionWeightsFile:
    """Where torch.hub keeps a torchvision weights file, and how to recognise it."""

    name: str
    url: str
    path: Path
    sha256_prefix: str
    keypoint_names: tuple[str, ...] | None = None  # the meta's, for keypoint weights (COCO's 17)

    @classmethod
    def of(cls, name: str) -> TorchvisionWeightsFile:
        try:
            weights = torchvision.models.get_weight(name)
        except (KeyError, ValueError) as error:
            raise WeightsError(f"unknown torchvision weights name {name!r}: {error}") from None
        file_name = weights.url.rsplit("/", 1)[-1]
        found = torch.hub.HASH_REGEX.search(file_name)
        names = weights.meta.get("keypoint_names")
        return cls(str(weights), weights.url, Path(torch.hub.get_dir()) / "checkpoints" / file_name,
                   found.group(1) if found else "", tuple(names) if names else None)

    def missing_message(self, key: str) -> str:
        """Where to put the file, or how to give it as `key` (the config key that named it)."""
        fetch_name = self.path.name
        return (
            f"torchvision weights {self.name} are not on this machine, and dist_kp never downloads at run time.\n"
            f"  Put {fetch_name} (sha256 starting {self.sha256_prefix}) at {self.path}\n"
            f"  (torch's hub cache: $TORCH_HOME/hub/checkpoints/, TORCH_HOME defaults to ~/.cache/torch;"
            f" point TORCH_HOME at a shared folder for every node),\n"
            f"  or give the file's path or object-store URL instead: {key}=s3://bucket/weights/{fetch_name}.\n"
            f"  On a machine with internet: curl -L -o {fetch_name} {self.url}\n"
            f"  then `sha256sum {fetch_name}` must start with {self.sha256_prefix}; copy the file to the nodes."
        )

    def read(self, key: str = "model.weights") -> dict[str, torch.Tensor]:
        """The state dict from the hub cache; never downloads (the file must be there; `key` named it)."""
        if not self.path.is_file():
            raise WeightsError(self.missing_message(key))
        if self.sha256_prefix:
            digest = hashlib.sha256()
            with self.path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
            if not digest.hexdigest().startswith(self.sha256_prefix):
                log.warning("%s: sha256 %s does not start with %s as torchvision's file does: another version "
                            "or a damaged copy of %s", self.path, digest.hexdigest()[:16], self.sha256_prefix,
                            self.name)
        return read_weights_file(str(self.path)).state


def _is_torchvision_name(source: str) -> bool:
    return "_Weights." in source and "/" not in source


@dataclass(frozen=True)
class WeightsFile:
    """What a weights file holds: the state dict, and what a dist_kp file records beside it.

    model_config: the model config it was written with (model_final.pt, model_best.pt, a checkpoint);
    None for a bare state dict. keypoints: category_id, keypoint_names, skeleton (model_final.pt,
    model_best.pt, checkpoints since they record them); None otherwise. checkpoint: a training
    checkpoint's state.pt (optimizer and progress beside the model, which are not needed here).
    """

    source: str
    state: dict[str, torch.Tensor]
    model_config: dict[str, Any] | None = None
    keypoints: dict[str, Any] | None = None
    checkpoint: bool = False

    @property
    def keypoint_names(self) -> list[str] | None:
        """The joints the file's model predicts, in its order, where the file records them."""
        names = (self.keypoints or {}).get("keypoint_names")
        return [str(name) for name in names] if isinstance(names, list) else None


def _open_untrusted(source: str, store: Storage) -> Any:
    """The loaded object of a weights file; a folder is read as a checkpoint (its state.pt) or a run (its
    model_final.pt)."""
    try:
        with store.open(source, "rb") as f:
            return load_untrusted(f)
    except (FileNotFoundError, IsADirectoryError) as error:
        folder = source.rstrip("/")
        for name in (CHECKPOINT_STATE, MODEL_FINAL):
            try:
                with store.open(f"{folder}/{name}", "rb") as f:
                    return load_untrusted(f)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                continue
        if isinstance(error, IsADirectoryError):
            raise WeightsError(f"{source} is a folder with neither {CHECKPOINT_STATE} (a checkpoint, "
                               f"checkpoints/step_N/) nor {MODEL_FINAL} (a finished run): give one of those") from None
        raise WeightsError(f"weights file not found: {source}") from None


def read_weights_file(source: str, store: Storage | None = None) -> WeightsFile:
    """A weights file: a dist_kp model_final.pt / model_best.pt, a training checkpoint (its state.pt, or the
    checkpoints/step_N folder), a finished run's folder (its model_final.pt), or a bare state dict.
    Loaded as untrusted input (tensors and plain data only)."""
    try:
        # Without a Storage: the process-wide default that train configures (until every caller passes one).
        loaded = _open_untrusted(source, store or Storage())
    except WeightsError:
        raise
    except Exception as error:
        raise WeightsError(f"cannot load weights from {source}: {error}") from error
    if not isinstance(loaded, dict):
        raise WeightsError(f"{source} does not hold a state dict (got {type(loaded).__name__})")
    if not isinstance(loaded.get("model"), dict):
        return WeightsFile(source, loaded)
    # A dist_kp weights file (model_config beside the tensors) or a checkpoint (config.model).
    checkpoint = "model_config" not in loaded and isinstance(loaded.get("config"), dict)
    model_config = loaded.get("model_config") or (loaded.get("config") or {}).get("model")
    keypoints = loaded.get("keypoints")
    return WeightsFile(source, loaded["model"], model_config if isinstance(model_config, dict) else None,
                       keypoints if isinstance(keypoints, dict) else None, checkpoint)


def check_architecture(cfg: ModelConfig, written_with: dict | None, source: str) -> None:
    """Refuse weights written for another architecture (model.weights_any_architecture=true loads them anyway).

    Matching by name and shape alone lets a resnet50 file fill most of a resnet18 model, or an
    FPN 64 file the heads of an FPN 32 model, silently; a dist_kp file says what it was built as.
    """
    if written_with is None or cfg.weights_any_architecture:
        return
    differ = [f"model.{key}: file {written_with[key]!r}, this run {getattr(cfg, key)!r}"
              for key in ARCHITECTURE_KEYS if key in written_with and written_with[key] != getattr(cfg, key)]
    if differ:
        raise WeightsError(
            f"weights {source} were written for another architecture ({'; '.join(differ)}). Use the file's "
            "values for these keys, or set model.weights_any_architecture=true to load the tensors that match "
            "by name and shape and re-initialise the rest."
        )


def read_state_dict(source: str, store: Storage | None = None, key: str = "model.weights") -> dict[str, torch.Tensor]:
    """A state dict from a torchvision weights name (hub cache only), a local path or an fsspec URL."""
    if _is_torchvision_name(source):
        return TorchvisionWeightsFile.of(source).read(key)
    return read_weights_file(source, store).state


@dataclass(frozen=True)
class JointRows:
    """The keypoint predictor's joints by name: the file's joint names and this model's.

    A model joint named in the file takes the file's row of that name (heatmap deconvolution weights
    and bias); the others keep their fresh initialisation (torchvision's: kaiming normal, bias 0).
    """

    file_names: tuple[str, ...]
    model_names: tuple[str, ...]

    @property
    def file_rows(self) -> list[int | None]:
        """For each model joint, its row in the file, or None (not in the file)."""
        position = {name: i for i, name in reversed(list(enumerate(self.file_names)))}
        return [position.get(name) for name in self.model_names]

    @property
    def copied(self) -> list[str]:
        return [name for name, row in zip(self.model_names, self.file_rows) if row is not None]

    @property
    def initialised(self) -> list[str]:
        return [name for name, row in zip(self.model_names, self.file_rows) if row is None]

    @property
    def reordered(self) -> bool:
        """The shared joints come in another order than the file's."""
        rows = [row for row in self.file_rows if row is not None]
        return rows != sorted(rows)

    def copy_rows(self, fresh: torch.Tensor, theirs: torch.Tensor, dim: int) -> torch.Tensor:
        """`fresh` (the model's tensor) with the file's rows of the shared joints copied along `dim`."""
        pairs = [(i, row) for i, row in enumerate(self.file_rows) if row is not None]
        into = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        taken = torch.tensor([row for _, row in pairs], dtype=torch.long)
        return fresh.detach().clone().index_copy_(dim, into, theirs.to(fresh.dtype).index_select(dim, taken))

    def lines(self) -> list[str]:
        """The load table's lines: the joints copied by name, and the joints initialised."""
        how = "copied by name, reordered from the file's order" if self.reordered else "copied by name"
        return [f"keypoint predictor: {how}: {', '.join(self.copied)}",
                f"keypoint predictor: initialised: {', '.join(self.initialised) or 'none'}"]


@dataclass
class WeightsReport:
    """What a non-strict load did: tensors loaded, re-initialised (model shape, file shape or None), unused.

    by_name: the keypoint predictor's tensors filled row by row by joint name (model shape, file shape),
    with joints saying which; joints_note: why the joint names were not used, where the file names its joints.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]] = field(default_factory=dict)
    unused: dict[str, tuple[int, ...]] = field(default_factory=dict)
    by_name: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    joints: JointRows | None = None
    joints_note: str | None = None

    def table(self) -> str:
        """Loaded tensors counted per module; every re-initialised and unused tensor with its shapes; the
        keypoint predictor's joints copied by name and initialised, one line each."""
        copied = f"{len(self.by_name)} copied by joint name, " if self.by_name else ""
        lines = [f"weights from {self.source}: {len(self.loaded)} tensors loaded, {copied}{len(self.reinitialised)} "
                 f"re-initialised, {len(self.unused)} unused"]
        groups: dict[str, int] = {}
        for name in self.loaded:
            group = ".".join(name.split(".")[:-1][:2]) or name
            groups[group] = groups.get(group, 0) + 1
        lines += [f"  loaded          {group}  ({count} tensors)" for group, count in groups.items()]
        lines += [f"  by joint name   {name}  model {_shape(model_shape)}, file {_shape(file_shape)}"
                  for name, (model_shape, file_shape) in self.by_name.items()]
        if self.joints is not None:
            lines += [f"  {line}" for line in self.joints.lines()]
        if self.joints_note is not None:
            lines.append(f"  keypoint predictor: {self.joints_note}")
        for name, (model_shape, file_shape) in self.reinitialised.items():
            found = "not in the file" if file_shape is None else f"file {_shape(file_shape)}"
            lines.append(f"  re-initialised  {name}  model {_shape(model_shape)}, {found}")
        lines += [f"  unused          {name}  file {_shape(shape)}" for name, shape in self.unused.items()]
        return "\n".join(lines)


def _shape(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
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


def _fits_but_keypoints(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], count: int) -> bool:
    """Both keypoint predictor tensors in the file, for `count` keypoints, their other dimensions the model's."""
    for name, dim in KEYPOINT_DIM.items():
        theirs = state.get(name)
        if name not in own or theirs is None or theirs.dim() != own[name].dim() or theirs.shape[dim] != count:
            return False
        others = [d for d in range(theirs.dim()) if d != dim]
        if [theirs.shape[d] for d in others] != [own[name].shape[d] for d in others]:
            return False
    return True


def _joints_by_name(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], file_names: Sequence[str] | None,
                    model_names: Sequence[str] | None, report: WeightsReport) -> dict[str, torch.Tensor]:
    """The keypoint predictor's tensors with the rows of the joints named in both copied, when the names say more
    than the shapes do (other joints, or the same in another order); else {} and the tensors load by shape."""
    if not file_names or not model_names or not _fits_but_keypoints(own, state, len(file_names)):
        return {}
    joints = JointRows(tuple(file_names), tuple(model_names))
    if joints.file_names == joints.model_names:
        return {}
    if not joints.copied:
        same_shape = all(tuple(state[name].shape) == tuple(own[name].shape) for name in KEYPOINT_DIM)
        report.joints_note = (f"no joint name in common (file: {', '.join(file_names)}; this model: "
                              f"{', '.join(model_names)}): " +
                              ("loaded by position, as the shapes match" if same_shape else "re-initialised"))
        return {}
    report.joints = joints
    for name, dim in KEYPOINT_DIM.items():
        report.by_name[name] = (tuple(own[name].shape), tuple(state[name].shape))
    return {name: joints.copy_rows(own[name], state[name], dim) for name, dim in KEYPOINT_DIM.items()}


def _load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                   file_keypoints: Sequence[str] | None = None,
                   keypoint_names: Sequence[str] | None = None) -> WeightsReport:
    report = WeightsReport(source)
    own = module.state_dict()
    by_name = _joints_by_name(own, state, file_keypoints, keypoint_names, report)
    for name, tensor in own.items():
        theirs = state.get(name)
        if name in by_name:
            continue
        if theirs is not None and tuple(theirs.shape) == tuple(tensor.shape):
            report.loaded.append(name)
        else:
            report.reinitialised[name] = (tuple(tensor.shape), None if theirs is None else tuple(theirs.shape))
    # FrozenBatchNorm2d has no num_batches_tracked counter: a file's counters are not worth a line each.
    report.unused = {name: tuple(t.shape) for name, t in state.items()
                     if name not in own and not name.endswith("num_batches_tracked")}
    total = sum(t.numel() for t in own.values())
    matching = sum(own[name].numel() for name in [*report.loaded, *by_name])
    if matching < MIN_MATCHING_FRACTION * total:
        examples = "; ".join(
            f"{name}: model {_shape(m)}, {'not in the file' if f is None else 'file ' + _shape(f)}"
            for name, (m, f) in list(report.reinitialised.items())[:5])
        raise WeightsError(
            f"weights {source} are not weights of this model: only {len(report.loaded)} of {len(own)} tensors "
            f"({100 * matching / max(total, 1):.0f}% of the values) match by name and shape, e.g. {examples}. "
            "Another backbone or other head sizes (model.*) than the run that wrote them? "
            "Backbone-only weights go to model.backbone_weights."
        )
    module.load_state_dict({**{name: state[name] for name in report.loaded}, **by_name}, strict=False)
    return report


def load_weights(module: nn.Module, source: str, strict: bool = False, store: Storage | None = None,
                 architecture: ModelConfig | None = None, key: str = "model.weights",
                 keypoint_names: Sequence[str] | None = None) -> WeightsReport:
    """Load weights into a freshly built module; `key` is the config key that names them (in messages).

    architecture: the config `module` was built from; a dist_kp file written for other values of
    its ARCHITECTURE_KEYS is refused (see check_architecture).

    strict: every tensor must be there with its shape, and nothing else (a mismatch names the keys).
    Otherwise every tensor whose name and shape match is loaded and the others keep the module's
    fresh initialisation (a keypoint predictor for another number of keypoints, a box predictor for
    another number of classes); rank 0 logs the table of what was loaded, re-initialised and unused.
    A file in which less than half of the model's values match is refused (another architecture).

    keypoint_names: the joints the module predicts, in its order. Where the file names its joints too
    (a dist_kp weights file or checkpoint, torchvision's COCO weights) and they differ, the keypoint
    predictor's rows of the joints named in both are copied by name (the others keep their fresh
    initialisation); with no name in common the predictor loads by shape as without names, and the
    table says so.
    """
    try:
        if _is_torchvision_name(source):
            torchvision_file = TorchvisionWeightsFile.of(source)
            state, written_with = torchvision_file.read(key), None
            file_keypoints = torchvision_file.keypoint_names
        else:
            file = read_weights_file(source, store)
            state, written_with, file_keypoints = file.state, file.model_config, file.keypoint_names
    except WeightsError as error:
        raise WeightsError(f"{key}: {error}") from None
    if architecture is not None:
        check_architecture(architecture, written_with, source)
    return load_state(module, state, source, strict, file_keypoints, keypoint_names)


def load_state(module: nn.Module, state: dict[str, torch.Tensor], source: str, strict: bool = False,
               file_keypoints: Sequence[str] | None = None,
               keypoint_names: Sequence[str] | None = None) -> WeightsReport:
    """Load a state dict read from `source` into a module, strictly or the tensors that match (see load_weights);
    file_keypoints: the joint names the file records, keypoint_names: the module's."""
    if strict:
        _load_strict(module, state, source)
        log.info("loaded weights from %s (strict)", source)
        return WeightsReport(source, loaded=list(state))
    report = _load_matching(module, state, source, file_keypoints, keypoint_names)
    if distributed.is_main_process():
        log.info("%s", report.table())
        log.debug("loaded tensors from %s:\n  %s", source, "\n  ".join(report.loaded))
    return report


def resolved_norm_layer(cfg: ModelConfig) -> Literal["frozen_bn", "bn"]:
    """model.norm_layer with auto decided: frozen BN when the model starts from pretrained weights."""
    if cfg.norm_layer == "auto":
        return "frozen_bn" if cfg.backbone_weights or cfg.weights else "bn"
    return cfg.norm_layer


def _norm_layer(cfg: ModelConfig) -> type[nn.Module]:
    return FrozenBatchNorm2d if resolved_norm_layer(cfg) == "frozen_bn" else nn.BatchNorm2d


def _trainable_layers(cfg: ModelConfig) -> int:
    # As torchvision: without any pretrained weights every backbone stage trains.
    if cfg.trainable_backbone_layers is None:
        return 3 if cfg.backbone_weights or cfg.weights else 5
    return cfg.trainable_backbone_layers


def _resnet_backbone(cfg: ModelConfig, norm_layer: type[nn.Module], store: Storage | None
                     ) -> tuple[BackboneWithFPN, int]:
    resnet = getattr(torchvision.models, cfg.backbone)(weights=None, norm_layer=norm_layer)
    if cfg.backbone_weights:
        load_weights(resnet, cfg.backbone_weights, cfg.weights_strict, store, key="model.backbone_weights")
    stages = cfg.backbone_stages
    layers = [f"layer{i}" for i in range(stages, 0, -1)] + ["conv1"]  # the deepest first, as trained
    trainable = layers[: _trainable_layers(cfg)]
    if _trainable_layers(cfg) >= len(layers):
        trainable.append("bn1")
    for name, parameter in resnet.named_parameters():
        if all(not name.startswith(layer) for layer in trainable):
            parameter.requires_grad_(False)
    stage_channels = resnet.inplanes // 8
    in_channels = [stage_channels * 2**i for i in range(stages)]
    # The stages past the last returned one are not part of the model (IntermediateLayerGetter).
    return_layers = {f"layer{i + 1}": str(i) for i in range(stages)}
    fpn = BackboneWithFPN(resnet, return_layers, in_channels, cfg.fpn_channels, extra_blocks=LastLevelMaxPool())
    return fpn, stages


def _mobilenet_backbone(cfg: ModelConfig, norm_layer: type[nn.Module], store: Storage | None
                        ) -> tuple[BackboneWithFPN, int]:
    mobilenet = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm_layer)
    if cfg.backbone_weights:
        load_weights(mobilenet, cfg.backbone_weights, cfg.weights_strict, store, key="model.backbone_weights")
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


def build_model(cfg: ModelConfig, num_keypoints: int, store: Storage | None = None,
                keypoint_names: Sequence[str] | None = None) -> KeypointRCNN:
    """Keypoint R-CNN for one 'person' class with `num_keypoints` keypoints; `store` reads weights URLs.

    keypoint_names: the joints it predicts, in order; model.weights that name theirs give the rows of the
    joints named in both (see load_weights).
    """
    if keypoint_names is not None and len(keypoint_names) != num_keypoints:
        raise ValueError(f"{num_keypoints} keypoints, but {len(keypoint_names)} keypoint names: {list(keypoint_names)}")
    norm_layer = _norm_layer(cfg)
    if cfg.backbone == "mobilenet_v3_large":
        backbone, levels = _mobilenet_backbone(cfg, norm_layer, store)
        anchor_generator = AnchorGenerator(((32, 64, 128, 256, 512),) * (levels + 1), ((0.5, 1.0, 2.0),) * (levels + 1))
    else:
        backbone, levels = _resnet_backbone(cfg, norm_layer, store)
        # torchvision's anchors (one size per FPN level, 32 to 512 with all five), one level per stage + pool
        sizes = ((32,), (64,), (128,), (256,), (512,))[: levels + 1]
        anchor_generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
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
        load_weights(model, cfg.weights, cfg.weights_strict, store, architecture=cfg, keypoint_names=keypoint_names)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def weights_payload(model: nn.Module, model_cfg: ModelConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """What an inference weights file holds: the state dict plus what predict needs to rebuild it."""
    state = OrderedDict((k, v.detach().cpu()) for k, v in unwrap(model).state_dict().items())
    return {"model": state, "model_config": model_cfg.model_dump(mode="json"), "keypoints": meta}
