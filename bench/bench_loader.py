"""The training loader's CPU share at COCO's image sizes: CPU cores per GPU for N img/s (issue 23 item 3).

    .venv/bin/python bench/bench_loader.py [--images 384] [--batches 60] [--repeats 3]

Writes a COCO-layout training set of photographic JPEGs at COCO's sizes (640x480, 480x640,
640x640; quality 90, about COCO's 160 KB per image): the synthetic generator's drawn people
(dist_kp.data.synthetic) over crops of matplotlib's sample photograph, with sensor-like noise.
Then, on that set and with configs/coco_kp_r50_fpn.yaml (batch 2 per GPU, flips 0.5, aspect-ratio
groups):

1. dist_kp's training loader as `build_train_loader` makes it (decode + flip + targets in the
   workers; the resize to shorter side 640-800 / longest 1333 is the model's, on the GPU) for
   train.workers = 0, 1, 2: images/s, and CPU ms per image in the workers and in the main process
   (from /proc, so less sensitive to other load than the wall-clock rate).
2. The same with decoding moved to the GPU: the CPU part that remains, the same sampler, index,
   loader options and flip decisions, with a dataset that returns the file's bytes and the
   (flipped) target instead of the decoded image.
3. Where one worker's time goes per image, each stage run alone in one thread (CPU time of the
   thread): read, decode, target, flip, collate, send the batch to the training process; "the rest"
   is one worker's CPU ms per image in (1) minus their sum. The training process's receiving, and
   the model's resize + normalise (on the GPU in training) as it would cost on one CPU thread.
4. Cores per GPU for N img/s: ceil(N x one worker's CPU ms per image) workers + 1 (the training
   process), with CPU decoding and with GPU decoding.

Rates are the best of --repeats passes (one epoch each) after a warm-up, CPU times the lowest:
other processes may share the CPUs. Files are read from the page cache (written just before).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from dist_kp.config import load_config
from dist_kp.data.coco import KeypointDataset, SampleKey, build_target, collate
from dist_kp.data.loaders import build_train_loader, train_index
from dist_kp.data.synthetic import COCO_KEYPOINT_NAMES, COCO_SKELETON, _draw_image
from dist_kp.data.transforms import horizontal_flip, sample_generator
from dist_kp.storage import Storage, local_path

REPO = Path(__file__).resolve().parents[1]
COCO_CONFIG = REPO / "configs/coco_kp_r50_fpn.yaml"
COCO_SIZES = [(640, 480), (640, 480), (480, 640), (640, 640)]  # (width, height): mostly landscape, as COCO
TARGETS = (40, 100, 200, 400, 800)  # img/s per GPU the sizing table is given for
log = logging.getLogger("bench_loader")


def photographic_set(root: Path, count: int, noise: float) -> Path:
    """COCO layout under root: train2017/*.jpg and annotations/person_keypoints_train2017.json."""
    from matplotlib import cbook

    photo = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((1280, 1500)))
    rng = np.random.default_rng(0)
    (root / "train2017").mkdir(parents=True)
    images, annotations = [], []
    for n in range(count):
        width, height = COCO_SIZES[n % len(COCO_SIZES)]
        drawing, people = _draw_image(rng, width, height, int(rng.integers(1, 4)))
        pixels = np.asarray(drawing)
        background = (pixels == pixels[0, 0]).all(-1, keepdims=True)
        x, y = int(rng.integers(0, photo.shape[1] - width)), int(rng.integers(0, photo.shape[0] - height))
        picture = np.where(background, photo[y:y + height, x:x + width], pixels).astype(np.float32)
        picture += rng.normal(0, noise, picture.shape).astype(np.float32)
        file_name = f"{n + 1:012d}.jpg"
        Image.fromarray(picture.clip(0, 255).astype(np.uint8)).save(root / "train2017" / file_name, quality=90)
        images.append({"id": n + 1, "file_name": file_name, "width": width, "height": height})
        annotations += [{"id": len(annotations) + 1, "image_id": n + 1, "category_id": 1, **person}
                        for person in people]
    categories = [{"id": 1, "name": "person", "keypoints": COCO_KEYPOINT_NAMES, "skeleton": COCO_SKELETON}]
    (root / "annotations").mkdir()
    (root / "annotations" / "person_keypoints_train2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


class EncodedImages(torch.utils.data.Dataset):
    """A worker's part once decoding moves to the GPU: the image file's bytes and its target, flipped
    when the image is to be flipped (the same decision as KeypointDataset's); the pixels are flipped
    on the GPU after decoding."""

    def __init__(self, dataset: KeypointDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        data = self.dataset
        # Bytes in a tensor of its own: read_file's tensor maps the file, and a loader worker cannot send it
        # (pickling it fails with EBADF in the queue's feeder thread, and the main process waits forever).
        encoded = torch.frombuffer(bytearray(Path(local_path(data.image_url(key.index))).read_bytes()),
                                   dtype=torch.uint8)
        position = int(data.positions[key.index])
        target = build_target(data.index, position, train=True)
        if sample_generator(data.seed, key.epoch, key.index).random() < data.hflip_prob:
            no_rows = torch.empty(3, 0, int(data.index.widths[position]), dtype=torch.uint8)  # only the width counts
            _, target = horizontal_flip(no_rows, target, data.flip_permutation)
        return encoded, target, 0


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a process's live threads (/proc schedstat: nanoseconds, unlike stat's 10 ms ticks)."""
    return sum(int((task / "schedstat").read_text().split()[0]) for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9


def children() -> list[int]:
    pid = os.getpid()
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


@dataclass
class Rate:
    """The best of several passes: other load lowers a rate and raises CPU times (caches, contention)."""

    images_per_s: float  # wall clock, highest pass
    worker_ms: float     # CPU ms per image in the worker processes, lowest pass
    main_ms: float       # CPU ms per image in the main (training) process, lowest pass


def loader_rate(loader: torch.utils.data.DataLoader, batches: int, repeats: int) -> Rate:
    """Steady-state rate: per pass (one epoch of the sampler), skip the first batches (start, prefetch)
    and time the next `batches`."""
    warmup = 2 + loader.num_workers * (loader.prefetch_factor or 0)
    if len(loader.batch_sampler) < warmup + batches:
        raise SystemExit(f"--images too small: an epoch has {len(loader.batch_sampler)} batches, "
                         f"{warmup} warm-up + --batches {batches} are needed")
    best = Rate(0.0, math.inf, math.inf)
    for epoch in range(repeats):
        loader.batch_sampler.set_epoch(epoch)
        batches_left = iter(loader)
        for _ in range(warmup):
            next(batches_left)
        workers = children()
        start_wall, start_main = time.perf_counter(), time.process_time()
        start_workers = sum(cpu_seconds(pid) for pid in workers)
        images = sum(len(next(batches_left)[0]) for _ in range(batches))
        wall, main = time.perf_counter() - start_wall, time.process_time() - start_main
        in_workers = sum(cpu_seconds(pid) for pid in workers) - start_workers
        for _ in batches_left:  # the epoch's rest, so the next pass starts from a clean state
            pass
        best = Rate(max(best.images_per_s, images / wall), min(best.worker_ms, 1e3 * in_workers / images),
                    min(best.main_ms, 1e3 * main / images))
    return best


def with_dataset(loader: torch.utils.data.DataLoader, dataset: torch.utils.data.Dataset,
                 workers: int) -> torch.utils.data.DataLoader:
    """A loader with `loader`'s sampler, collate and options over another dataset."""
    options = {"num_workers": workers, "collate_fn": loader.collate_fn, "pin_memory": loader.pin_memory,
               "generator": loader.generator}
    if workers:
        options.update(persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor)
    return torch.utils.data.DataLoader(dataset, batch_sampler=loader.batch_sampler, **options)


def stage_ms(run: Callable[[int], object], count: int, repeats: int) -> float:
    """Best of `repeats` passes of run(0..count-1): CPU ms of this thread per call (other load does not count)."""
    best = math.inf
    for _ in range(repeats):
        start = time.thread_time()
        for i in range(count):
            run(i)
        best = min(best, time.thread_time() - start)
    return 1e3 * best / count


def read_bytes(path: str) -> torch.Tensor:
    """The file's bytes in a tensor of its own (read_file's tensor maps the file: its reads would count as decoding)."""
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


def hand_over_ms(batches: list, repeats: int) -> tuple[float, float]:
    """CPU ms per image, best of `repeats`, to send the batches as a loader worker does (pickle them, the
    images moved into shared memory) and to receive them as the training process does (unpickle, map)."""
    send = receive = math.inf
    for _ in range(repeats):
        # Fresh images, as a worker's are: pickling moves an image into shared memory once, in place.
        fresh = [([image.clone() for image in images], *rest) for images, *rest in batches]
        start = time.thread_time()
        messages = [ForkingPickler.dumps(batch) for batch in fresh]
        middle = time.thread_time()
        for message in messages:  # also frees the shared memory, which waits for a receiver
            pickle.loads(message)
        send, receive = min(send, middle - start), min(receive, time.thread_time() - middle)
    images = sum(len(batch[0]) for batch in batches)
    return 1e3 * send / images, 1e3 * receive / images


def stages(dataset: KeypointDataset, count: int, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """CPU ms per image, one thread: (the steps of a worker's KeypointDataset.__getitem__ + collate + sending
    the batch, the steps outside the worker: receiving the batch, and the model's resize if it ran on a CPU)."""
    cfg = load_config(COCO_CONFIG)
    paths = [local_path(dataset.image_url(i)) for i in range(count)]
    encoded = [read_bytes(path) for path in paths]
    decoded = [decode_image(data, mode=ImageReadMode.RGB) for data in encoded]
    targets = [build_target(dataset.index, int(dataset.positions[i]), train=True) for i in range(count)]
    batches = [collate([(decoded[i], targets[i], 0) for i in (j, j + 1)]) for j in range(0, count - 1, 2)]

    def flip(i: int) -> None:  # the dataset's decision, then the image and target of the flipped half
        if sample_generator(dataset.seed, 0, i).random() < dataset.hflip_prob:
            horizontal_flip(decoded[i], targets[i], dataset.flip_permutation)

    transform = GeneralizedRCNNTransform(cfg.model.min_size, cfg.model.max_size,
                                         [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    floats = [image.float().div_(255.0) for image in decoded]
    pairs = len(batches)
    send, receive = hand_over_ms(batches, repeats)
    in_worker = {
        "read (file bytes, page cache)": stage_ms(lambda i: read_bytes(paths[i]), count, repeats),
        "decode (JPEG to uint8 RGB)": stage_ms(lambda i: decode_image(encoded[i], mode=ImageReadMode.RGB),
                                               count, repeats),
        "target (build_target)": stage_ms(
            lambda i: build_target(dataset.index, int(dataset.positions[i]), train=True), count, repeats),
        "flip (the decision; image + target of the flipped half)": stage_ms(flip, count, repeats),
        "collate": stage_ms(lambda j: collate([(decoded[2 * j], targets[2 * j], 0)] * 2), pairs, repeats) / 2,
        "send (pickle, image into shared memory)": send,
    }
    outside = {
        "receive (unpickle, map the shared memory)": receive,
        "resize + normalise (the model's transform, on the GPU; here on one CPU thread)": stage_ms(
            lambda j: transform(floats[2 * j: 2 * j + 2]), pairs, repeats) / 2,
    }
    return in_worker, outside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=384, help="training images to write (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=60, help="batches timed per pass (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="passes; the best counts (default: %(default)s)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="train.workers to measure")
    parser.add_argument("--noise", type=float, default=16.0, help="pixel noise sigma (sets the JPEG size)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)  # what a loader worker runs with; the main process's share stays one core
    with tempfile.TemporaryDirectory(prefix="bench_loader-") as tmp:
        root = photographic_set(Path(tmp) / "coco", args.images, args.noise)
        sizes = [p.stat().st_size for p in (root / "train2017").glob("*.jpg")]
        log.info("%d JPEGs at %s, %.0f KB on average (COCO train2017: about 160 KB), %d CPUs, load %.1f",
                 len(sizes), ", ".join(sorted({f"{w}x{h}" for w, h in COCO_SIZES})), np.mean(sizes) / 1e3,
                 os.cpu_count(), os.getloadavg()[0])
        storage = Storage()
        rows, dataset = [], None
        for workers in args.workers:
            cfg = load_config(COCO_CONFIG, [f"data.root={root}", f"data.cache_dir={tmp}/cache",
                                            f"train.workers={workers}"])
            loader, _ = build_train_loader(cfg, train_index(cfg, storage), 0, 1, torch.device("cpu"), storage)
            dataset = loader.dataset
            decoded = loader_rate(loader, args.batches, args.repeats)
            encoded = loader_rate(with_dataset(loader, EncodedImages(loader.dataset), workers),
                                  args.batches, args.repeats)
            rows.append((workers, decoded, encoded))
            del loader
        log.info("\n| train.workers | CPU decode: img/s | worker CPU ms/img | main CPU ms/img "
                 "| GPU decode (CPU part): img/s | worker CPU ms/img | main CPU ms/img |")
        log.info("|---|---|---|---|---|---|---|")
        for workers, decoded, encoded in rows:
            log.info("| %d | %.0f | %.2f | %.2f | %.0f | %.2f | %.2f |", workers, decoded.images_per_s,
                     decoded.worker_ms, decoded.main_ms, encoded.images_per_s, encoded.worker_ms, encoded.main_ms)

        in_worker, outside = stages(dataset, min(len(dataset), 128), args.repeats)
        one_worker = next((decoded for workers, decoded, _ in rows if workers == 1), None)
        log.info("\n| stage (CPU decode; one thread) | CPU ms/image |\n|---|---|")
        for name, ms in in_worker.items():
            log.info("| worker: %s | %.2f |", name, ms)
        log.info("| worker: sum of the above | %.2f |", sum(in_worker.values()))
        if one_worker is not None:
            log.info("| worker: the rest (the loader's worker loop and queues: 1 worker's CPU ms/img - the sum) "
                     "| %.2f |", one_worker.worker_ms - sum(in_worker.values()))
        for name, ms in outside.items():
            log.info("| training process: %s | %.2f |", name, ms)

        if one_worker is None:
            return
        one_encoded = next(encoded for workers, _, encoded in rows if workers == 1)
        log.info("\nPer core (one worker's CPU ms/img at train.workers=1): CPU decode %.0f img/s, GPU decode %.0f "
                 "img/s; best wall-clock rate of that worker: %.0f and %.0f img/s", 1e3 / one_worker.worker_ms,
                 1e3 / one_encoded.worker_ms, one_worker.images_per_s, one_encoded.images_per_s)
        log.info("Cores per GPU for N img/s = ceil(N / per-core img/s) workers + 1 (the training process)")
        log.info("| N img/s per GPU | CPU decode: workers | cores | GPU decode: workers | cores |")
        log.info("|---|---|---|---|---|")
        for target in TARGETS:
            cpu = math.ceil(target * one_worker.worker_ms / 1e3)
            gpu = math.ceil(target * one_encoded.worker_ms / 1e3)
            log.info("| %d | %d | %d | %d | %d |", target, cpu, cpu + 1, gpu, gpu + 1)


if __name__ == "__main__":
    main()
