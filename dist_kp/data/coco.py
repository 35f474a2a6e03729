"""Training and evaluation samples of a KeypointIndex: targets, the training filter, image decoding, the dataset.

Training samples drop crowd annotations, degenerate boxes and images with too few visible
keypoints (`training_filter` counts each reason); evaluation keeps every image. Every image is
read through the `Storage` the dataset is given (it travels with the dataset into loader workers).
"""

from __future__ import annotations

import io
import logging
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2.functional import to_dtype

from dist_kp.data.index import DataError, KeypointIndex, PackedStrings
from dist_kp.data.transforms import horizontal_flip, sample_generator
from dist_kp.storage import Storage, is_local_url, local_path

log = logging.getLogger(__name__)


def build_target(index: KeypointIndex, i: int, train: bool) -> dict[str, torch.Tensor]:
    """Target of image i: boxes xyxy clamped to the image, labels, keypoints [N, K, 3], image_id.

    Training drops crowd annotations and boxes that are empty after clamping.
    """
    rows = index.annotation_rows(i)
    xywh = index.boxes[rows]
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, index.widths[i])
    xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, index.heights[i])
    keep = np.ones(len(xyxy), bool)
    if train:
        keep = (index.iscrowd[rows] == 0) & (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    return {
        "boxes": torch.from_numpy(xyxy[keep].astype(np.float32)).reshape(-1, 4),
        "labels": torch.ones(int(keep.sum()), dtype=torch.int64),
        "keypoints": torch.from_numpy(index.keypoints[rows][keep].astype(np.float32)).reshape(
            -1, index.meta.num_keypoints, 3),
        "image_id": torch.tensor(int(index.image_ids[i])),
        "iscrowd": torch.from_numpy(index.iscrowd[rows][keep].astype(np.int64)),
        "area": torch.from_numpy(index.areas[rows][keep].astype(np.float32)),
    }


def min_visible_for_skeleton(configured: int | None, num_keypoints: int) -> int:
    """data.min_visible_keypoints for a skeleton of num_keypoints: the configured value, or when None the
    torchvision reference's 10 of COCO's 17 scaled, round(10 * K / 17) (17 keypoints: 10, 5: 3)."""
    return round(10 * num_keypoints / 17) if configured is None else configured


@dataclass(frozen=True)
class TrainingFilter:
    """The images training keeps, and how many it drops for each reason.

    A dropped image is counted once, for the first reason that applies: no person annotation,
    only crowd annotations, only boxes that are empty once clamped to the image, fewer visible
    keypoints (on its usable boxes) than min_visible_keypoints.
    """

    positions: np.ndarray  # int64 positions of the kept images
    images: int
    min_visible_keypoints: int
    without_annotations: int
    only_crowd: int
    only_empty_boxes: int
    too_few_keypoints: int

    def reasons(self) -> str:
        """Each reason with the number of images it dropped."""
        return (f"{self.without_annotations} without person annotations, {self.only_crowd} with only crowd "
                f"annotations, {self.only_empty_boxes} whose boxes are all empty inside the image, "
                f"{self.too_few_keypoints} with fewer than {self.min_visible_keypoints} visible keypoints "
                "(data.min_visible_keypoints)")

    def describe(self) -> str:
        return f"{len(self.positions)} of {self.images} images kept; dropped: {self.reasons()}"


def training_filter(index: KeypointIndex, min_visible_keypoints: int) -> TrainingFilter:
    """build_target's training rules (crowd and boxes empty after clamping dropped) over all annotations at once."""
    image_of = np.repeat(np.arange(len(index)), np.diff(index.ann_offsets))
    x, y, w, h = (index.boxes[:, k] for k in range(4))
    width, height = index.widths[image_of], index.heights[image_of]
    crowd = index.iscrowd != 0
    usable = ~crowd & ((x + w).clip(0, width) > x.clip(0, width)) & ((y + h).clip(0, height) > y.clip(0, height))
    visible = (index.keypoints[:, :, 2].astype(np.float32) > 0).sum(axis=1)
    annotations = np.bincount(image_of, minlength=len(index))
    not_crowd = np.bincount(image_of[~crowd], minlength=len(index))
    boxes_kept = np.bincount(image_of[usable], minlength=len(index))
    visible_kept = np.bincount(image_of[usable], weights=visible[usable], minlength=len(index))
    few = (boxes_kept > 0) & (visible_kept < min_visible_keypoints)
    return TrainingFilter(
        positions=np.flatnonzero((boxes_kept > 0) & ~few).astype(np.int64),
        images=len(index),
        min_visible_keypoints=min_visible_keypoints,
        without_annotations=int((annotations == 0).sum()),
        only_crowd=int(((annotations > 0) & (not_crowd == 0)).sum()),
        only_empty_boxes=int(((not_crowd > 0) & (boxes_kept == 0)).sum()),
        too_few_keypoints=int(few.sum()),
    )


def trainable_images(index: KeypointIndex, min_visible_keypoints: int) -> np.ndarray:
    """Positions of images whose training target has at least one box and enough visible keypoints.

    Taken from the cache when it holds them, else training_filter(...).positions.
    """
    cached = index.trainable.get(min_visible_keypoints)
    if cached is not None:
        return cached
    return training_filter(index, min_visible_keypoints).positions


def keypoints_outside_images(index: KeypointIndex, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(annotation rows, keypoint numbers) of visible keypoints outside their image, over the images at positions."""
    image_of = np.repeat(np.arange(len(index)), np.diff(index.ann_offsets))
    selected = np.zeros(len(index), bool)
    selected[positions] = True
    x, y, v = (index.keypoints[..., k] for k in range(3))  # views: no copy of the (memory-mapped) array
    width, height = index.widths[image_of][:, None], index.heights[image_of][:, None]
    outside = (v > 0) & ((x < 0) | (x > width) | (y < 0) | (y > height)) & selected[image_of][:, None]
    return np.nonzero(outside)


def leaves_folder(file_name: str) -> bool:
    """Whether an image file name points outside the image folder: absolute, a URL, or climbing out with '..'."""
    return file_name.startswith("/") or "://" in file_name or posixpath.normpath(file_name).split("/")[0] == ".."


def file_names_leaving_folder(names: Sequence[str]) -> list[int]:
    """Positions of the names for which leaves_folder holds."""
    if isinstance(names, PackedStrings):  # one scan of the bytes spares decoding every name of a large index
        lengths = np.diff(names.offsets)
        leading = names.blob[names.offsets[:-1][lengths > 0]]
        text = names.blob.tobytes()
        if b".." not in text and b"://" not in text and not (leading == ord("/")).any():
            return []
    return [i for i, name in enumerate(names) if leaves_folder(name)]


def read_image(url: str, storage: Storage) -> torch.Tensor:
    """Decode a JPEG/PNG (local path or fsspec URL) to a uint8 RGB tensor [3, H, W], values 0-255.

    A local file is read straight into a tensor; a URL is fetched whole in one request through
    `storage`. 16-bit PNGs are scaled to 8 bits; any other sample type is refused naming the file.
    """
    if is_local_url(url):
        data = read_file(local_path(url))
    else:
        fs, path = storage.url_to_fs(url)
        data = torch.frombuffer(bytearray(fs.cat_file(path)), dtype=torch.uint8)
    return decode_file_data(data, url)


def decode_file_data(data: torch.Tensor, url: str) -> torch.Tensor:
    """read_image's decoding of a file's bytes (uint8 [num_bytes]) read from `url`."""
    image = decode_image(data, mode=ImageReadMode.RGB)
    if image.dtype == torch.uint16:
        return to_dtype(image, torch.uint8, scale=True)
    if image.dtype != torch.uint8:
        raise DataError(f"{url}: decodes to {image.dtype} samples, expected 8 or 16 bits per channel")
    return image


@dataclass
class EncodedImage:
    """A training image as the loader hands it on with data.decode=device: its JPEG file's bytes, and whether
    the image and its target are to be mirrored once decoded (dist_kp.data.device_batches does both)."""

    data: bytes
    flip: bool
    url: str


# JPEG colour modes torchvision.io.decode_jpeg turns into RGB on every device (not CMYK, nor 16-bit).
DEVICE_DECODED_MODES = ("RGB", "L")


def read_encoded(url: str, storage: Storage) -> tuple[bytes, tuple[int, int] | None]:
    """The file's bytes and, for a JPEG that decode_jpeg takes on any device, its (width, height) read from the
    header only; None for any other file (PNG, CMYK JPEG), which the loader decodes itself."""
    if is_local_url(url):
        with open(local_path(url), "rb") as f:
            data = f.read()
    else:
        fs, path = storage.url_to_fs(url)
        data = fs.cat_file(path)
    with Image.open(io.BytesIO(data)) as header:  # reads the header, decodes nothing
        size = header.size if header.format == "JPEG" and header.mode in DEVICE_DECODED_MODES else None
    return data, size


# Training images looked up one by one at start; the folder is listed (to count) only when one is missing.
IMAGES_CHECKED_AT_START = 16
# Names shown in the message about missing images.
MISSING_SHOWN = 3


def missing_image_files(image_root: str, names: Sequence[str], storage: Storage) -> list[str]:
    """The names with no file under `image_root`, in order: one listing of each folder they lie in."""
    fs, root = storage.url_to_fs(image_root)
    by_folder: dict[str, list[str]] = {}
    for name in names:
        by_folder.setdefault(posixpath.dirname(name), []).append(name)
    missing: set[str] = set()
    with storage.named_errors(image_root):
        for folder, in_folder in by_folder.items():
            try:
                listed = fs.ls(posixpath.join(root, folder) if folder else root, detail=False)
            except (FileNotFoundError, NotADirectoryError):
                listed = []
            present = {posixpath.basename(path.rstrip("/")) for path in listed}
            missing.update(name for name in in_folder if posixpath.basename(name) not in present)
    return [name for name in names if name in missing]


class SampleKey(NamedTuple):
    """What the batch sampler hands the dataset: the sample and the epoch it is drawn in."""

    index: int
    epoch: int


class KeypointDataset(torch.utils.data.Dataset):
    """Images of a KeypointIndex with their targets.

    Training: items are addressed by SampleKey(index, epoch) so that augmentation decisions
    come from (seed, epoch, index), never from a worker's running RNG. Evaluation: by int.
    A training image that cannot be read, or whose size differs from its annotation record, is
    replaced by the next good one and counted (batches keep their size, so every rank still runs
    the same steps); an evaluation image of that kind is an error.

    Refused at construction: file names that leave the image folder, and a training set that
    filtering leaves empty (the message counts each reason). Warned about: visible keypoints
    outside their image. `check_images_present` refuses a folder that lacks most of the images.
    Images are read through `storage`, which is pickled with the dataset into loader workers.
    """

    def __init__(
        self, index: KeypointIndex, image_root: str, storage: Storage, train: bool, min_visible_keypoints: int = 0,
        hflip_prob: float = 0.0, seed: int = 0,
        flip_permutation: list[int] | None = None,  # None: index.meta's (pairs inferred from the names)
        decode: bool = True,  # False (data.decode=device): hand on JPEG bytes as EncodedImage
    ) -> None:
        self.index = index
        self.decode = decode
        self.image_root = image_root.rstrip("/")
        self.storage = storage
        self.train = train
        self.hflip_prob = hflip_prob
        self.seed = seed
        self.flip_permutation = index.meta.flip_permutation if flip_permutation is None else flip_permutation
        leaving = file_names_leaving_folder(index.file_names)
        if leaving:
            named = ", ".join(f"image id={int(index.image_ids[i])} file_name={index.file_names[i]!r}"
                              for i in leaving[:5])
            raise DataError(f"{index.source}: {len(leaving)} image file names leave the image folder "
                            f"{self.image_root}: {named}{', ...' if len(leaving) > 5 else ''}")
        if not train:
            self.positions = np.arange(len(index))
            return
        self.positions = trainable_images(index, min_visible_keypoints)
        if not len(self.positions):
            raise DataError(f"{index.source}: no training images left after filtering "
                            f"({training_filter(index, min_visible_keypoints).describe()})")
        self._warn_keypoints_outside()

    def _warn_keypoints_outside(self) -> None:
        rows, numbers = keypoints_outside_images(self.index, self.positions)
        if not len(rows):
            return
        row, k = int(rows[0]), int(numbers[0])
        i = int(np.searchsorted(self.index.ann_offsets, row, side="right")) - 1
        x, y = self.index.keypoints[row, k, :2]
        log.warning("%s: %d visible keypoints of %d training annotations lie outside their image, e.g. annotation "
                    "id=%d of image id=%d (%dx%d): %s at (%g, %g)", self.index.source, len(rows),
                    len(np.unique(rows)), int(self.index.ann_ids[row]), int(self.index.image_ids[i]),
                    int(self.index.widths[i]), int(self.index.heights[i]), self.index.meta.keypoint_names[k], x, y)

    def check_images_present(self, option: str) -> None:
        """Refuse, in one error, a training image folder that lacks most of the images of the annotations.

        The first IMAGES_CHECKED_AT_START images are looked up; only when one of them is missing is
        the folder listed to count them. More than half missing is the wrong folder: refused, naming
        `option` (the config key of the folder), the folder, the count and the first names. Fewer are
        warned about once; training skips each when its turn comes.
        """
        fs, root = self.storage.url_to_fs(self.image_root)
        first = [self.index.file_names[int(i)] for i in self.positions[:IMAGES_CHECKED_AT_START]]
        with self.storage.named_errors(self.image_root):
            if all(fs.exists(f"{root}/{name}") for name in first):
                return
        names = [self.index.file_names[int(i)] for i in self.positions]
        missing = missing_image_files(self.image_root, names, self.storage)
        if not missing:
            return
        shown = ", ".join(missing[:MISSING_SHOWN]) + (", ..." if len(missing) > MISSING_SHOWN else "")
        message = (f"{option}={self.image_root}: {len(missing)} of {len(names)} training images listed in "
                   f"{self.index.source} are missing (first: {shown})")
        if 2 * len(missing) > len(names):
            raise DataError(f"{message}; point {option} (relative to data.root) at the folder that holds them")
        log.warning("%s; training skips them", message)

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def aspect_ratios(self) -> np.ndarray:
        return self.index.aspect_ratios[self.positions]

    def image_url(self, item: int) -> str:
        return f"{self.image_root}/{self.index.file_names[self.positions[item]]}"

    def _read(self, item: int) -> torch.Tensor | EncodedImage:
        """The image of item, whose size must be the one its annotation record gives: decoded, or (decode=False)
        the bytes of a JPEG the device decodes."""
        url = self.image_url(item)
        image: torch.Tensor | EncodedImage
        if self.decode:
            image = read_image(url, self.storage)
            size = (image.shape[-1], image.shape[-2])
        else:
            data, header_size = read_encoded(url, self.storage)
            if header_size is None:
                image = decode_file_data(torch.frombuffer(bytearray(data), dtype=torch.uint8), url)
                size = (image.shape[-1], image.shape[-2])
            else:
                image, size = EncodedImage(data, False, url), header_size
        i = int(self.positions[item])
        width, height = int(self.index.widths[i]), int(self.index.heights[i])
        if size != (width, height):
            raise DataError(f"{url} is {size[0]}x{size[1]} pixels, but image id="
                            f"{int(self.index.image_ids[i])} of {self.index.source} is {width}x{height}")
        return image

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor | EncodedImage, dict[str, torch.Tensor], int]:
        """(image uint8 [3, H, W], target, number of unusable images skipped to get here). With decode=False a
        JPEG comes as EncodedImage, its target not yet flipped (the device flips both)."""
        item, epoch = (key.index, key.epoch) if isinstance(key, SampleKey) else (int(key), 0)
        skipped = 0
        while True:
            try:
                image = self._read(item)
                break
            except Exception as error:  # noqa: BLE001 - any unreadable file is skipped and named
                if not self.train:
                    raise DataError(f"cannot read evaluation image {self.image_url(item)}: {error}") from error
                log.warning("skipping training image %s: %s", self.image_url(item), error)
                skipped += 1
                if skipped >= min(len(self), 100):
                    raise DataError(f"{skipped} unusable images in a row under {self.image_root} "
                                    f"(the last: {error})") from error
                item = (item + 1) % len(self)
        target = build_target(self.index, int(self.positions[item]), train=self.train)
        if self.train and self.hflip_prob > 0:
            if sample_generator(self.seed, epoch, item).random() < self.hflip_prob:
                if isinstance(image, EncodedImage):
                    image.flip = True
                else:
                    image, target = horizontal_flip(image, target, self.flip_permutation)
        return image, target, skipped


def _rebuild_targets(targets: list[dict[str, np.ndarray]]) -> TargetList:
    return TargetList({key: torch.from_numpy(value) for key, value in target.items()} for target in targets)


class TargetList(list):
    """A batch's targets. From a loader worker they travel inside the message as array bytes:
    as tensors each of the ~6 small tensors per image would get a shared-memory file of its own,
    which made a worker's batches reach the training process about 2x slower (bench/bench_index.py)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_targets, ([{key: value.numpy() for key, value in target.items()} for target in self],)

    def __copy__(self) -> TargetList:
        # pin_memory copies the batch with copy.copy: a shallow copy, not a trip through __reduce__.
        return TargetList(self)


def collate(batch: list[Any]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], int]:
    """Lists of images and targets (sizes differ), plus how many unreadable images were skipped."""
    return [b[0] for b in batch], TargetList(b[1] for b in batch), sum(b[2] for b in batch)
