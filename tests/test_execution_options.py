"""The GPU-side options (issue 23), each in the form a CPU runs: the same training as with the option off.

data.decode=device runs its decode and flip code on the CPU; channels_last and foreach/fused SGD
run as they are; data.prefetch and train.cudnn_benchmark change nothing off CUDA; train.compile
is checked at start (compiling the backbone on two CPU cores takes minutes).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from dist_kp import Hook
from dist_kp.config import ConfigError, TrainConfig, load_config
from dist_kp.data.coco import EncodedImage, SampleKey
from dist_kp.data.device_batches import BatchPrefetcher, DeviceBatches
from dist_kp.data.loaders import build_train_loader, train_index
from dist_kp.data.synthetic import generate
from dist_kp.engine.run_state import identity_changes
from dist_kp.engine.schedule import apply_optim_config, build_optimizer, build_scheduler
from dist_kp.engine.trainer import Trainer
from dist_kp.model.execution import apply_execution_options, check_execution_options
from dist_kp.model.keypoint_rcnn import build_model
from dist_kp.storage import Storage
from tests.conftest import TINY_CONFIG, tiny_overrides
from tests.test_trainer import build_trainer

CPU = torch.device("cpu")
# Pairs of the config, not those the names imply: the device flip must take the configured permutation.
FLIP_PAIRS = "data.flip_pairs=[[left_shoulder, right_shoulder], [left_hip, right_hip]]"


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 training images; the second holds a PNG under its .jpg name (the loader decodes it under decode=device)."""
    root = generate(tmp_path_factory.mktemp("mixed"), train=12, val=2, seed=3)
    second = sorted((root / "train2017").glob("*.jpg"))[1]
    buffer = io.BytesIO()
    Image.open(second).convert("RGB").save(buffer, "PNG")
    second.write_bytes(buffer.getvalue())
    return root


def device_batches(root: Path, tmp_path: Path, decode: str, *extra: str) -> list:
    cfg = load_config(TINY_CONFIG, tiny_overrides(root, tmp_path / "run", "train.workers=0", "train.batch_size=4",
                                                  "data.hflip_prob=0.5", FLIP_PAIRS, f"data.decode={decode}",
                                                  f"data.cache_dir={tmp_path / 'cache'}", *extra))
    store = Storage.from_config(cfg.storage)
    loader, sampler = build_train_loader(cfg, train_index(cfg, store), 0, 1, CPU, store)
    sampler.set_epoch(1)
    return list(DeviceBatches(loader, CPU, cfg.data.prefetch))


def test_device_decode_gives_the_images_and_targets_of_loader_decode_flips_included(mixed_root: Path,
                                                                                      tmp_path: Path) -> None:
    on_loader = device_batches(mixed_root, tmp_path, "loader")
    on_device = device_batches(mixed_root, tmp_path, "device", "data.prefetch=true")
    unflipped = device_batches(mixed_root, tmp_path, "loader", "data.hflip_prob=0")
    assert [len(images) for images, _, _ in on_device] == [4, 4, 4]
    flipped = 0
    for (images, targets, _), (device_images, device_targets, _), (_, plain, _) in zip(on_loader, on_device,
                                                                                     unflipped, strict=True):
        for image, device_image, target, device_target, plain_target in zip(images, device_images, targets,
                                                                            device_targets, plain, strict=True):
            assert device_image.dtype == torch.float32 and device_image.shape == image.shape
            assert (device_image - image).abs().max() <= 2 / 255  # decoders may round differently
            assert device_target.keys() == target.keys()
            for key in target:
                assert torch.allclose(device_target[key].float(), target[key].float(), atol=1e-4), key
            flipped += not torch.equal(target["boxes"], plain_target["boxes"])
    assert 0 < flipped < 12  # some of each, drawn from (seed, epoch, sample) as the loader draws them


def training_set(root: Path, tmp_path: Path, *extra: str) -> torch.utils.data.Dataset:
    cfg = load_config(TINY_CONFIG, tiny_overrides(root, tmp_path / "run", FLIP_PAIRS, *extra))
    store = Storage.from_config(cfg.storage)
    return build_train_loader(cfg, train_index(cfg, store), 0, 1, CPU, store)[0].dataset


def test_device_decode_hands_jpeg_bytes_and_the_flip_on_and_decodes_other_files_in_the_loader(
        mixed_root: Path, tmp_path: Path) -> None:
    dataset = training_set(mixed_root, tmp_path, "data.decode=device", "data.hflip_prob=1")
    unflipped = training_set(mixed_root, tmp_path, "data.hflip_prob=0")
    jpeg, target, _ = dataset[SampleKey(0, 0)]
    assert isinstance(jpeg, EncodedImage) and jpeg.flip and jpeg.data[:2] == b"\xff\xd8"
    assert torch.equal(target["keypoints"], unflipped[SampleKey(0, 0)][1]["keypoints"])  # flipped on the device
    png, target, _ = dataset[SampleKey(1, 0)]
    image, plain, _ = unflipped[SampleKey(1, 0)]
    assert isinstance(png, torch.Tensor) and torch.equal(png, image.flip(-1))  # decoded and flipped by the loader
    assert not torch.equal(target["boxes"], plain["boxes"])


def test_the_prefetcher_off_cuda_hands_out_every_prepared_item_in_order() -> None:
    prepared: list[int] = []

    def prepare(item: int) -> dict[str, torch.Tensor]:
        prepared.append(item)
        return {"value": torch.tensor([item * 10])}

    out = [batch["value"].item() for batch in BatchPrefetcher(range(5), prepare, CPU)]
    assert out == [0, 10, 20, 30, 40] and prepared == [0, 1, 2, 3, 4]


class Losses(Hook):
    def __init__(self) -> None:
        self.values: list[float] = []

    def after_step(self, trainer: Trainer) -> None:
        self.values.append(trainer.log_record["train/loss"])


def loss_trajectory(root: Path, out: Path, *overrides: str) -> list[float]:
    torch.manual_seed(0)  # the same initial weights and RPN/RoI sampling for every option
    trainer = build_trainer(root, out, "train.max_steps=3", "train.batch_size=2", *overrides)
    losses = Losses()
    trainer.register(losses)
    trainer.train()
    return losses.values


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("small"), train=16, val=4, seed=1)


def test_channels_last_foreach_fused_and_device_decode_train_the_loss_trajectory_of_the_defaults(
        small_root: Path, tmp_path: Path) -> None:
    baseline = loss_trajectory(small_root, tmp_path / "base")
    assert len(baseline) == 3
    for option in ("train.channels_last=true", "optim.implementation=foreach", "optim.implementation=fused",
                   "data.decode=device", "data.prefetch=true", "train.cudnn_benchmark=true"):
        losses = loss_trajectory(small_root, tmp_path / option.replace("=", "-"), option)
        # channels_last runs other convolution kernels (another summation order), whose differences grow
        # with each step: 5e-4 seen at step 3 in one shuffled order; a step moves the loss by ~1e-2.
        tolerance = 2e-3 if option == "train.channels_last=true" else 1e-4
        assert losses == pytest.approx(baseline, rel=tolerance), option


def test_a_resume_takes_the_configured_sgd_implementation_not_the_saved_one() -> None:
    model = torch.nn.Linear(3, 2)
    saved_cfg = load_config(TINY_CONFIG)
    saved = build_optimizer(model, saved_cfg).state_dict()
    cfg = load_config(TINY_CONFIG, ["optim.implementation=fused"])
    optimizer = build_optimizer(model, cfg)
    optimizer.load_state_dict(saved)
    assert not optimizer.param_groups[0]["fused"]  # load_state_dict put the saved flag back
    apply_optim_config(optimizer, build_scheduler(optimizer, cfg, 1), cfg.optim)
    assert optimizer.param_groups[0]["fused"] and not optimizer.param_groups[0]["foreach"]


def test_compile_on_a_cpu_without_a_cpp_compiler_is_refused_naming_the_key(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    cfg = TrainConfig(compile="backbone")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no compiler on PATH
    with pytest.raises(ConfigError, match=r"train.compile=backbone on the CPU needs a C\+\+ compiler.*"
                                          r"train.compile=none"):
        check_execution_options(cfg, CPU)
    check_execution_options(TrainConfig(), CPU)  # compile=none needs nothing


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler")
def test_compiling_the_backbone_and_channels_last_keep_the_model_and_its_checkpoint_keys(small_root: Path) -> None:
    cfg = load_config(TINY_CONFIG)
    torch.manual_seed(0)
    eager = build_model(cfg.model, 17)
    torch.manual_seed(0)
    model = build_model(cfg.model, 17)
    benchmark = torch.backends.cudnn.benchmark
    apply_execution_options(model, TrainConfig(compile="backbone", channels_last=True, cudnn_benchmark=True), CPU)
    assert torch.backends.cudnn.benchmark == benchmark  # a CUDA setting, left alone on the CPU
    state, eager_state = model.state_dict(), eager.state_dict()
    assert list(state) == list(eager_state)  # compiled in place: no _orig_mod in the names
    assert all(torch.equal(state[k], eager_state[k]) for k in state)
    conv = model.backbone.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_every_option_may_change_on_resume_none_makes_it_another_run() -> None:
    changed = {"train.channels_last": (False, True), "train.cudnn_benchmark": (False, True),
               "train.compile": ("none", "backbone"), "optim.implementation": ("default", "fused"),
               "data.decode": ("loader", "device"), "data.prefetch": (False, True)}
    assert identity_changes(changed) == []
