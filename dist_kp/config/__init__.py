"""Run configuration: pydantic models loaded from YAML plus dotted command-line overrides.

    cfg = load_config("configs/synthetic_cpu.yaml", ["optim.lr=0.01", "train.epochs=2"])

Unknown keys, wrong types and impossible values raise `ConfigError`, whose message names
the key and the file it came from. Keys that name a credential are refused at any depth
(`dist_kp.config.secrets`), and a JSON dump of any section (`model_dump(mode="json")`: config.yaml,
checkpoints, W&B) never holds one: URL passwords and query strings, and the values of storage
options off the allow list, read `<redacted>`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from dist_kp.config.errors import ConfigError
from dist_kp.config.packaged import resolve_config
from dist_kp.config.secrets import public_storage_options, redact, redact_text, redact_url, secret_key_paths

# OKS sigmas are the true per-keypoint sigma (nose 0.026 ... ankles 0.089), as pycocotools'
# params.kpt_oks_sigmas and mmpose hold them. Their source writes them x10 and divides by 10:
# so do we, for the very same doubles (0.26 / 10 is not the double nearest 0.026).
COCO_KEYPOINT_SIGMAS = [s / 10.0 for s in (
    0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72,
    0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89,
)]
# COCO's largest is 0.107 (hips), custom skeletons reach ~0.15; the x10 source form starts at .25.
MAX_OKS_SIGMA = 0.2

log = logging.getLogger(__name__)


def oks_sigma_problem(sigmas: list[float]) -> str | None:
    """Why these OKS sigmas cannot be true sigmas (each in (0, MAX_OKS_SIGMA]), naming the x10 mistake; else None."""
    convention = f"OKS sigmas are the true sigma of each keypoint, e.g. COCO nose 0.026, in (0, {MAX_OKS_SIGMA}]"
    if not all(s > 0 for s in sigmas):  # also NaN
        return f"{convention}; got {sigmas}: each must be positive"
    if any(s > MAX_OKS_SIGMA for s in sigmas):
        return (f"{convention}; got {sigmas}: values look 10x too large (pycocotools' source form .26 = 0.026): "
                "divide them by 10")
    return None


# Where each section's credentials come from instead (the config refuses them).
CREDENTIAL_SOURCES = {
    "tracking": "set WANDB_API_KEY in the environment or run `wandb login`",
    "storage": "use the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AZURE_STORAGE_*, "
               "GOOGLE_APPLICATION_CREDENTIALS) or the provider's credential chain",
}
# Keys of earlier versions, refused with the key that replaced them (no silent aliasing).
MOVED_KEYS = {
    ("checkpoint", "storage_options"): ("storage.options", "one storage section for data reads and outputs"),
    ("checkpoint", "timeout_s"): ("storage.timeout_s", "one storage section for data reads and outputs"),
    ("train", "amp"): ("train.precision", "fp32, fp16 or bf16; amp: true was fp16"),
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_serializer(mode="wrap")
    def _without_credentials(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        # JSON dumps are what gets written (config.yaml, checkpoints, W&B); Python dumps keep the values.
        data = handler(self)
        return redact(data) if info.mode_is_json() else data


class StorageConfig(Section):
    """fsspec access for data reads and outputs alike. Credentials come from the environment, never from here."""

    options: dict[str, Any] = Field(
        default_factory=dict, description="Non-secret fsspec options (e.g. endpoint_url, region, client_kwargs);"
        " credential-like keys are refused, values off the allow list are written as <redacted>."
    )
    timeout_s: float = Field(
        60.0, gt=0.0, description="Seconds an object-store request may wait for the server (connect: at most 10),"
        " and how long it retries transient errors (5xx, 429, refused or reset connections) with backoff."
    )

    @field_validator("options")
    @classmethod
    def _nested_options_are_mappings(cls, options: dict[str, Any]) -> dict[str, Any]:
        # The value is never echoed: it may be a credential under a harmless-looking name.
        for key in ("client_kwargs", "config_kwargs", "s3_additional_kwargs"):
            if key in options and not isinstance(options[key], dict):
                raise ValueError(f"{key} must be a mapping of options, got a {type(options[key]).__name__}")
        return options

    @field_serializer("options", when_used="json")
    def _public_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return public_storage_options(options)


class DataConfig(Section):
    """Where the COCO-format person-keypoints data lives and how samples are drawn."""

    root: str = Field("data/coco", description="Dataset root (local path or fsspec URL) in COCO layout.")
    train_images: str = Field("train2017", description="Training image folder, relative to root.")
    val_images: str = Field("val2017", description="Validation image folder, relative to root.")
    train_annotations: str = Field(
        "annotations/person_keypoints_train2017.json", description="Training annotation JSON, relative to root."
    )
    val_annotations: str = Field(
        "annotations/person_keypoints_val2017.json", description="Validation annotation JSON, relative to root."
    )
    min_visible_keypoints: int | None = Field(
        None, ge=0, description="Training drops images with fewer visible keypoints, counted over all the people of "
        "an image. null: follows the skeleton, torchvision's 10 of COCO's 17 scaled: round(10 * K / 17) for K "
        "keypoints (17: 10, 5: 3)."
    )
    aspect_ratio_group_factor: int = Field(
        3, ge=0, description="Aspect-ratio bins per side of 1 for batch grouping; 0 puts every image in one group."
    )
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0, description="Probability of a horizontal flip in training.")
    flip_pairs: list[tuple[str, str]] | None = Field(
        None, description="Keypoint names a horizontal flip swaps, e.g. [[LShoulder, RShoulder], [LHip, RHip]]; others"
        " map to themselves, [] swaps none. null: inferred from the names (left_x/right_x, l_x/r_x, x_left/x_right,"
        " x_l/x_r with _ - . or space, leftX/rightX, xLeft/xRight, LX/RX, any case); with flips on, a name that looks"
        " sided but has no partner is refused."
    )
    prefetch_factor: int = Field(2, ge=1, description="Batches each data-loader worker prepares ahead.")
    decode: Literal["loader", "device"] = Field(
        "loader", description="Where training images are decoded. loader: the data loader decodes each image on the "
        "CPU (in its workers). device: the loader reads the JPEG bytes (other formats it decodes), the training "
        "process decodes the batch with torchvision.io.decode_jpeg on the training device (nvJPEG on CUDA, the CPU "
        "on a CPU run) and flips images and targets there. Evaluation decodes in the loader either way."
    )
    prefetch: bool = Field(
        False, description="On CUDA, move (and with decode=device, decode) the next training batch on a side stream "
        "while the current step runs; on the CPU it changes nothing."
    )
    cache_dir: str | None = Field(
        None, description="Node-local folder for the annotation index cache; null: $TMPDIR/dist_kp_index-<uid>."
    )

    @field_validator("flip_pairs")
    @classmethod
    def _each_name_in_one_pair(cls, pairs: list[tuple[str, str]] | None) -> list[tuple[str, str]] | None:
        seen: set[str] = set()
        for pair in pairs or []:
            if pair[0] == pair[1]:
                raise ValueError(f"pair {list(pair)} names one keypoint twice; a keypoint in no pair maps to itself")
            for name in pair:
                if name in seen:
                    raise ValueError(f"{name!r} is in more than one pair; a keypoint has one mirror image")
                seen.add(name)
        return pairs


class ModelConfig(Section):
    """Keypoint R-CNN architecture. Defaults reproduce torchvision's keypointrcnn_resnet50_fpn."""

    backbone: Literal["resnet50", "resnet18", "mobilenet_v3_large"] = Field(
        "resnet50", description="Backbone network under the FPN (resnet18 or mobilenet_v3_large for small runs)."
    )
    backbone_stages: int = Field(
        4, ge=1, le=4, description="ResNet stages built and fed to the FPN (layer1 to layerN): fewer leave out the "
        "deepest, a smaller model for small pictures. ResNet backbones only (mobilenet_v3_large: 4)."
    )
    trainable_backbone_layers: int | None = Field(
        None, ge=0, le=5, description="Backbone stages trained, from the deepest built one down (conv1 last); null: "
        "3 with pretrained weights, else all."
    )
    norm_layer: Literal["auto", "frozen_bn", "bn"] = Field(
        "auto", description="Backbone norm: auto = frozen BN with pretrained backbone weights, else BN (torchvision)."
    )
    fpn_channels: int = Field(256, ge=1, description="Channels of every FPN level.")
    box_head_dim: int = Field(1024, ge=1, description="Width of the two-layer box head.")
    keypoint_head_layers: int = Field(8, ge=1, description="3x3 conv layers of the keypoint head.")
    keypoint_head_channels: int = Field(512, ge=1, description="Channels of each keypoint head layer.")
    rpn_batch_size_per_image: int = Field(256, ge=1, description="Anchors sampled per image for the RPN loss.")
    rpn_pre_nms_top_n_train: int = Field(2000, ge=1, description="RPN proposals kept before NMS, per level, in training.")
    rpn_post_nms_top_n_train: int = Field(2000, ge=1, description="RPN proposals kept after NMS in training.")
    rpn_pre_nms_top_n_test: int = Field(1000, ge=1, description="RPN proposals kept before NMS, per level, at inference.")
    rpn_post_nms_top_n_test: int = Field(1000, ge=1, description="RPN proposals kept after NMS at inference.")
    box_batch_size_per_image: int = Field(512, ge=1, description="RoIs sampled per image for the box head loss.")
    box_detections_per_img: int = Field(100, ge=1, description="Most detections returned per image.")
    min_size: list[int] = Field([640, 672, 704, 736, 768, 800], min_length=1, description="Train resize sizes.")
    max_size: int = Field(1333, ge=1, description="Longest image side after resizing.")
    weights: str | None = Field(
        None, description="Full-model weights: local path, fsspec URL, or torchvision weights name."
    )
    weights_strict: bool = Field(
        False, description="Refuse weights with any missing, extra or reshaped tensor (false: load the matching"
        " ones, re-initialise the rest, e.g. the keypoint predictor of another skeleton)."
    )
    weights_any_architecture: bool = Field(
        False, description="Load model.weights written by dist_kp for another architecture (backbone, FPN or head"
        " sizes): the tensors that match by name and shape load, the rest are re-initialised (false: refused)."
    )
    backbone_weights: str | None = Field(
        None, description="Backbone weights: torchvision name (e.g. ResNet50_Weights.IMAGENET1K_V1), path or URL."
    )

    @field_validator("backbone_stages")
    @classmethod
    def _stages_of_a_resnet(cls, stages: int, info: ValidationInfo) -> int:
        if stages != 4 and info.data.get("backbone") == "mobilenet_v3_large":
            raise ValueError("applies to ResNet backbones only: mobilenet_v3_large feeds the FPN its own two stages")
        return stages

    @field_validator("min_size")
    @classmethod
    def _sizes_are_positive(cls, sizes: list[int]) -> list[int]:
        if min(sizes) < 1:
            raise ValueError("every size (shorter image side after resizing) must be at least 1 pixel")
        return sizes

    @field_validator("max_size")
    @classmethod
    def _max_size_fits_min_size(cls, max_size: int, info: ValidationInfo) -> int:
        largest = max(info.data.get("min_size") or [0])
        if max_size < largest:
            raise ValueError(f"smaller than the largest model.min_size ({largest}): no image would reach that size")
        return max_size


class OptimConfig(Section):
    """SGD optimizer. lr is for the total batch; k times the recipe's batch: lr x k and schedule.warmup_iters / k."""

    lr: float = Field(0.02, gt=0.0, description="Base learning rate for the total batch (0.02 for 16 images).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0.0, description="L2 weight decay.")
    clip_grad_norm: float | None = Field(None, gt=0.0, description="Clip the global gradient norm; off when null.")
    implementation: Literal["default", "foreach", "fused"] = Field(
        "default", description="SGD kernels: default (torch's choice: foreach on CUDA, a loop per tensor on the "
        "CPU), foreach (multi-tensor), fused (one kernel). The same update; on resume the configured one is used."
    )


class ScheduleConfig(Section):
    """Learning-rate schedule, applied per iteration: linear warmup, then multi-step or cosine."""

    name: Literal["multistep", "cosine"] = Field("multistep", description="multistep (milestones, gamma) or cosine to 0.")
    milestones: list[int] = Field([36, 43], description="Epochs at which lr is multiplied by gamma (multistep).")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="lr factor at each milestone.")
    warmup_iters: int = Field(1000, ge=0, description="Optimizer steps of linear warmup (0: none); k times the "
                              "recipe's total batch: 1/k of them, the same images (1000 at 16 images per step).")
    warmup_factor: float = Field(0.001, gt=0.0, le=1.0, description="lr factor at the first iteration of warmup.")


class EarlyStopConfig(Section):
    """train.early_stop: stop when an evaluation metric stops improving."""

    metric: str = Field("kp/AP", description="Evaluation metric watched (kp/AP, bbox/AP, kp/AR, ...).")
    patience: int = Field(3, ge=1, description="Evaluations in a row without improvement before training stops.")
    mode: Literal["max", "min"] = Field("max", description="max: higher is better; min: lower is better.")


class EMAConfig(Section):
    """train.ema: an exponential moving average of the trained weights, used for evaluation and the weights files."""

    decay: float = Field(0.9998, gt=0.0, lt=1.0, description="Weight of the average at each optimizer step, once "
                         "warmed up: ema = d * ema + (1 - d) * weights.")
    warmup_steps: int = Field(2000, ge=0, description="Ramp of the decay: d = decay * (1 - exp(-updates / "
                              "warmup_steps)), so early weights fade fast; 0: d = decay from the first step.")


class TrainConfig(Section):
    """The training loop. batch_size is per process."""

    epochs: int = Field(46, ge=1, description="Epochs to train.")
    batch_size: int = Field(2, ge=1, description="Images per process per step.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many global steps (smoke runs).")
    workers: int = Field(4, ge=0, description="Data-loader worker processes per rank.")
    seed: int = Field(0, ge=0, description="Seed of data order, augmentation and initialisation.")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="fp32; bf16: autocast, no GradScaler (A100/H100, CPU); fp16: autocast with GradScaler "
        "(V100/T4; CUDA only). Training and evaluation alike."
    )
    log_every: int = Field(20, ge=1, description="Steps between progress log lines and metrics records; the last "
                           "step of every epoch and of the run is logged too.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda:LOCAL_RANK when CUDA is available (NCCL), else cpu (gloo)."
    )
    channels_last: bool = Field(
        False, description="Train with the backbone and FPN in channels-last memory format (the model's weights and "
        "the backbone's input); the same model and checkpoints, other kernels."
    )
    cudnn_benchmark: bool = Field(
        False, description="On CUDA, let cuDNN time its convolution algorithms for each new input shape (a few per "
        "aspect-ratio group and training size) and keep the fastest; no effect on the CPU."
    )
    compile: Literal["none", "backbone"] = Field(
        "none", description="torch.compile the backbone and FPN (the RoI heads, whose shapes change every step, stay "
        "eager); the first steps of each new input shape compile. Needs a C compiler on the CPU."
    )
    dist_timeout_s: int = Field(1800, ge=10, description="Collective timeout (seconds) of the process group.")
    stop_grace_s: float = Field(
        120.0, gt=0.0, description="After SIGUSR1/SIGTERM, seconds the current step may take before the process "
        "exits without a checkpoint."
    )
    hooks: list[str] = Field(
        default_factory=list, description='Extra training hooks, "module:Class" each (a subclass of dist_kp.Hook), '
        "built with the config."
    )
    early_stop: EarlyStopConfig | None = Field(
        None, description="Stop after `patience` evaluations without a better `metric`; null: train to the end."
    )
    ema: EMAConfig | None = Field(
        None, description="Keep an EMA of the weights (in every checkpoint); evaluation, model_final.pt and "
        "model_best.pt use it. null: off."
    )


class EvalConfig(Section):
    """Distributed COCO evaluation (OKS for keypoints, IoU for boxes)."""

    every_epochs: int = Field(1, ge=0, description="Evaluate every N epochs (0: only at the end).")
    at_end: bool = Field(True, description="Evaluate after the last step.")
    backend: Literal["faster_coco_eval", "pycocotools"] = Field(
        "faster_coco_eval", description="COCO evaluation library (both give the same numbers)."
    )
    batch_size: int = Field(2, ge=1, description="Images per process per inference batch.")
    keypoint_area: Literal["keypoints", "box"] = Field(
        "keypoints", description="Detection area for kp/APm, kp/APl: keypoints' extent (COCO protocol) or box."
    )
    max_images: int | None = Field(None, ge=1, description="Evaluate only the first N validation images.")
    sigmas: list[float] | None = Field(
        None, description="OKS sigma per keypoint, in the dataset's keypoint order: the true sigma (COCO's nose "
        "0.026, ankles 0.089), each in (0, 0.2]; pycocotools' source form (.26 = 0.026, 10x) is refused. null: "
        "COCO's 17."
    )
    num_visualize: int = Field(4, ge=0, description="Validation images drawn with predictions per evaluation.")

    @field_validator("sigmas")
    @classmethod
    def _sigmas_are_true_sigmas(cls, sigmas: list[float] | None) -> list[float] | None:
        problem = None if sigmas is None else oks_sigma_problem(sigmas)
        if problem:
            raise ValueError(problem)
        return sigmas


class CheckpointConfig(Section):
    """Checkpoints under output_dir/checkpoints/ and how a run resumes."""

    every_steps: int = Field(500, ge=1, description="Global steps between periodic checkpoints.")
    every_minutes: float | None = Field(
        None, gt=0.0, description="Also checkpoint once this many minutes passed since the last checkpoint (rank 0's "
        "clock; every rank saves at the same step). null: by steps only."
    )
    keep_last: int = Field(3, ge=1, description="Newest checkpoints kept (the one resumed from is kept too).")
    keep_every_epochs: int | None = Field(None, ge=1, description="Also keep the end-of-epoch checkpoint every K.")
    resume: str = Field("auto", description="auto (newest valid), none (fresh start), or a checkpoint URL/path.")
    overwrite: bool = Field(
        False, description="With resume: none, start over in an output_dir that has checkpoints (deletes them)."
    )
    keep_best: str | None = Field(
        None, description="Evaluation metric (kp/AP, bbox/AP, ...) whose best value so far keeps "
        "OUTPUT_DIR/model_best.pt; null: no best weights file."
    )
    keep_best_mode: Literal["max", "min"] = Field("max", description="keep_best: max (higher is better) or min.")


class TrackingConfig(Section):
    """Weights & Biases and TensorBoard tracking on rank 0. The W&B API key comes from the environment or `wandb login`."""

    mode: Literal["disabled", "offline", "online"] = Field(
        "disabled", description="online: stream to W&B; offline: write locally for `wandb sync`; disabled: off."
    )
    project: str = Field("dist_kp", description="W&B project.")
    entity: str | None = Field(None, description="W&B team or user; null: the login's default entity.")
    name: str | None = Field(None, description="Run name; null: the last part of output_dir.")
    group: str | None = Field(None, description="W&B run group.")
    tags: list[str] = Field(default_factory=list, description="W&B run tags.")
    notes: str | None = Field(None, description="W&B run notes.")
    tensorboard: bool = Field(
        False, description="Also write TensorBoard event files to OUTPUT_DIR/tensorboard/ (the scalars W&B gets); "
        "for an object-store output_dir, written locally and uploaded at checkpoints and at the end."
    )


class Config(Section):
    """A whole run. `output_dir` is a local path or any fsspec URL (s3://bucket/runs/exp1)."""

    output_dir: str = Field(
        "runs/default", description="Where the run writes everything: local path or fsspec URL (s3://bucket/run)."
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _schedule_fits_training(self) -> Config:
        if self.schedule.name == "multistep":
            milestones = self.schedule.milestones
            if sorted(milestones) != milestones:
                raise ValueError(f"schedule.milestones must be increasing, got {milestones}")
            if any(m < 1 for m in milestones):
                raise ValueError(f"schedule.milestones must be epochs >= 1, got {milestones}")
            late = [m for m in milestones if m >= self.train.epochs]
            if late:  # as torch's MultiStepLR: a short run (train.epochs=2) needs no second override
                log.warning("schedule.milestones %s: at or past the last epoch (train.epochs=%d), never applied; "
                            "ignored", late, self.train.epochs)
        return self


SECTIONS = {name: field.annotation for name, field in Config.model_fields.items() if name != "output_dir"}


def _parse_override(item: str) -> dict[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {redact_text(item)!r}: expected KEY=VALUE, e.g. optim.lr=0.01")
    try:
        value: Any = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {redact_text(item)!r}: the value is not valid YAML") from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["optim.lr=0.01", "train.epochs=2"] into a nested dict; values are parsed as YAML.

    A section value ('train={batch_size: 1}') is merged over the keys given before it, not
    put in their place.
    """
    nested: dict[str, Any] = {}
    for item in overrides:
        nested = _merge(nested, _parse_override(item))
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _moved_keys(raw: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(old key, new key, why) for each key of an earlier version in `raw`."""
    return [(".".join(old), new, why) for old, (new, why) in MOVED_KEYS.items()
            if isinstance(raw.get(old[0]), dict) and old[1] in raw[old[0]]]


def _show_override(item: str) -> str:
    """An override as error messages show it: without credentials, nor any value under a moved key."""
    try:
        moved = _moved_keys(_parse_override(item))
    except ConfigError:
        moved = []
    return f"{item.partition('=')[0]}=<redacted>" if moved else redact_text(item)


def _refused_keys(raw: dict[str, Any]) -> list[str]:
    """Error lines for keys no config may hold: moved ones and credentials (never their values)."""
    lines = [f"  {old}: moved to {new} ({why})" for old, new, why in _moved_keys(raw)]
    for path in secret_key_paths(raw):
        section = "storage" if path.startswith(("storage.", "checkpoint.storage_options.")) else path.split(".")[0]
        source = CREDENTIAL_SOURCES.get(section, "set it in the environment of the run")
        lines.append(f"  {path}: credentials do not belong in the config; {source}")
    return lines


def _describe(error: ValidationError) -> list[str]:
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `python -m dist_kp.train --help` for the sections)"
        # A whole section's input may hold a credential under a harmless name: never echo it.
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict) \
                and key != "storage" and not key.startswith("storage.options"):
            msg = f"{msg} (got {redact_text(repr(err['input']))})"
        lines.append(f"  {key}: {msg}")
    return lines


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a nested dict (a parsed YAML file plus overrides); `source` names it in errors."""
    problems = _refused_keys(raw)
    if not problems:
        try:
            return Config.model_validate(raw)
        except ValidationError as error:
            problems = _describe(error)
    raise ConfigError(redact_url("\n".join([f"invalid configuration in {source}:", *problems])))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or defaults when path is None) and apply dotted overrides."""
    path = resolve_config(path)  # a bare name (coco_kp_r50_fpn) is a packaged config
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {redact_text(str(error))}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
        source += " + command-line overrides " + " ".join(_show_override(o) for o in overrides)
    return config_from_dict(raw, source)


def config_to_yaml(cfg: Config) -> str:
    """The config as OUTPUT_DIR/config.yaml records it (credentials redacted, see the module docstring)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def sections_help() -> str:
    """One line per config section, for --help."""
    lines = ["output_dir: local path or fsspec URL where everything of the run is written"]
    for name, model in SECTIONS.items():
        doc = (model.__doc__ or "").strip().splitlines()[0]
        keys = ", ".join(model.model_fields)
        lines.append(f"{name}: {doc}\n    keys: {keys}")
    return "\n".join(lines)
