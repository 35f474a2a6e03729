"""The training loader's batches on the training device, as the trainer steps on them.

    batches = DeviceBatches(loader, device, prefetch=cfg.data.prefetch)
    for images, targets, skipped in batches:     # images float [0, 1] on `device`, targets on `device`
        ...

With data.decode=loader the batch holds uint8 images: they are moved as they are and become
float on the device. With data.decode=device the loader hands on JPEG bytes (`EncodedImage`):
the batch is decoded in one torchvision.io.decode_jpeg call on the device, and the images drawn
for a flip are mirrored there with their targets by the same `horizontal_flip` the loader uses
(so the targets are those of decode=loader). Resizing happens in the model on the device
either way (GeneralizedRCNNTransform). On a CPU run, device decoding runs the same code on the
CPU, in the training process.

data.prefetch on CUDA prepares the next batch on a side stream while the current step runs
(`BatchPrefetcher`); elsewhere batches are prepared when asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from dist_kp.data.coco import EncodedImage
from dist_kp.data.index import DataError
from dist_kp.data.transforms import horizontal_flip

Batch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], int]
T = TypeVar("T")


def decode_on_device(encoded: list[EncodedImage], device: torch.device) -> list[torch.Tensor]:
    """uint8 RGB [3, H, W] images on `device`, decoded in one call; a file that fails is named."""
    data = [torch.frombuffer(bytearray(image.data), dtype=torch.uint8) for image in encoded]
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        for image, one in zip(encoded, data, strict=True):  # which one: the batched call does not say
            try:
                decode_jpeg(one, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as error:
                raise DataError(f"cannot decode training image {image.url} on {device} (data.decode=device; its "
                                f"header read fine in the loader): {error}") from error
        raise


def device_transforms(images: list[torch.Tensor | EncodedImage], targets: list[dict[str, torch.Tensor]],
                      device: torch.device, flip_permutation: list[int]
                      ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A loader batch on `device`, images float [0, 1]: uint8 images (data.decode=loader, or PNGs) moved as they
    are; encoded ones decoded there in one call, then flipped with their targets where the loader drew a flip."""
    non_blocking = device.type == "cuda"
    encoded = [image for image in images if isinstance(image, EncodedImage)]
    decoded = iter(decode_on_device(encoded, device) if encoded else [])
    out_images, out_targets = [], []
    for image, target in zip(images, targets, strict=True):
        target = {k: v.to(device, non_blocking=non_blocking) for k, v in target.items()}
        if isinstance(image, EncodedImage):
            pixels = next(decoded)
            if image.flip:
                pixels, target = horizontal_flip(pixels, target, flip_permutation)
        else:
            pixels = image.to(device, non_blocking=non_blocking)
        out_images.append(pixels.float().div_(255.0))
        out_targets.append(target)
    return out_images, out_targets


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class BatchPrefetcher:
    """Iterate `prepare(item)` for each item of `items`, in order. On a CUDA device the next item is prepared on
    a side stream while the caller works on the current one; on any other device each is prepared when asked
    for (a plain pass-through).

    CUDA: the main stream waits for the side stream before a prepared item is handed out, and every CUDA
    tensor of it is recorded on the main stream (record_stream), so the caching allocator does not reuse
    its memory for the next item while the step still reads it.
    """

    def __init__(self, items: Iterable[T], prepare: Callable[[T], Any], device: torch.device) -> None:
        self.items = items
        self.prepare = prepare
        self.device = device

    def __iter__(self) -> Iterator[Any]:
        if self.device.type != "cuda":
            return (self.prepare(item) for item in self.items)
        return self._side_stream()

    def _side_stream(self) -> Iterator[Any]:
        stream = torch.cuda.Stream(self.device)
        source = iter(self.items)

        def start_next() -> Any:
            item = next(source, None)
            if item is None:
                return None
            with torch.cuda.stream(stream):
                return self.prepare(item)

        upcoming = start_next()
        while upcoming is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(stream)
            for tensor in _tensors(upcoming):
                if tensor.device.type == "cuda":
                    tensor.record_stream(main)
            current, upcoming = upcoming, start_next()  # the next batch's copies overlap this step
            yield current


class DeviceBatches:
    """The training loader's batches, (images float [0, 1], targets, skipped images), on the training device.

    prefetch: on CUDA, prepare the next batch on a side stream (BatchPrefetcher); elsewhere it changes nothing.
    `dataset` and `len()` are the loader's.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device, prefetch: bool = False) -> None:
        self.loader = loader
        self.device = device
        self.prefetch = prefetch
        self.flip_permutation: list[int] = loader.dataset.flip_permutation  # a KeypointDataset's

    @property
    def dataset(self) -> torch.utils.data.Dataset:
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def prepare(self, batch: tuple[list[Any], list[dict[str, torch.Tensor]], int]) -> Batch:
        images, targets, skipped = batch
        images, targets = device_transforms(images, targets, self.device, self.flip_permutation)
        return images, targets, skipped

    def __iter__(self) -> Iterator[Batch]:
        if self.prefetch:
            return iter(BatchPrefetcher(self.loader, self.prepare, self.device))
        return (self.prepare(batch) for batch in self.loader)
