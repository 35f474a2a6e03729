"""Start-up and data-loading benchmark at COCO-train scale (issue 7).

    .venv/bin/python bench/bench_index.py [--work /tmp/dist_kp_bench_index] [--repeats 3]

Generates (once, kept in --work) a COCO-train-scale person-keypoints file: 118,287 images,
262,465 person annotations on 64,115 images, ~10% without keypoints, ~1% crowd (RLE), polygons
of ~22 points, ~230 MB; and 64 photographic 640x480 JPEGs (crops of matplotlib's sample photo)
with their own small annotation file. Then, each in a fresh process:

- start-up of one rank, reference style: pycocotools COCO() + the reference's per-image filter
  (images with too few visible keypoints dropped) + aspect-ratio grouping;
- start-up of one rank with the index cache: cold (the one builder of the node: hash, stream
  the JSON, write the cache) and warm (every other rank: map the cache);
- JSON parse alone: json.load vs orjson.loads of the whole file, and the streaming builder;
- images/s of one data-loading worker: reference style (PIL decode, polygon masks, float on
  the CPU, flip) vs dist_kp's KeypointDataset (decode to uint8, no masks, flip on uint8),
  in the process and through a DataLoader with one worker.

Memory is the process's RSS above what it holds after its imports: peak (VmHWM, reset after
the imports) and kept (VmRSS once start-up is done, with its objects alive). Prints two
markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_index")
REPO = Path(__file__).resolve().parents[1]
MIN_VISIBLE = 10


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


# ---------------------------------------------------------------- data generation

def coco_scale_annotations(num_images: int = 118_287, person_images: int = 64_115, people: int = 262_465,
                           sizes: tuple[tuple[int, int], ...] | None = None, seed: int = 0) -> dict:
    """A person-keypoints file with COCO train's counts and record shapes."""
    from dist_kp.data.synthetic import COCO_KEYPOINT_NAMES, COCO_SKELETON

    rng = np.random.default_rng(seed)
    sizes = sizes or ((640, 480), (480, 640), (640, 427), (427, 640), (640, 640), (500, 375))
    weights = np.array([0.45, 0.15, 0.2, 0.1, 0.05, 0.05][:len(sizes)])
    which = rng.choice(len(sizes), num_images, p=weights / weights.sum())
    ids = (np.arange(num_images) * 5 + 9).tolist()
    images = [{"license": n % 8 + 1, "file_name": f"{i:012d}.jpg",
               "coco_url": f"http://images.cocodataset.org/train2017/{i:012d}.jpg",
               "height": sizes[w][1], "width": sizes[w][0], "date_captured": "2013-11-14 11:18:45",
               "flickr_url": f"http://farm4.staticflickr.com/3153/{i}_8dd8f9fb5a_z.jpg", "id": i}
              for n, (i, w) in enumerate(zip(ids, which.tolist()))]
    with_people = rng.choice(num_images, person_images, replace=False)
    owners = np.concatenate([with_people, rng.choice(with_people, people - person_images)])
    rng.shuffle(owners)
    W = np.array([sizes[w][0] for w in which])[owners].astype(float)
    H = np.array([sizes[w][1] for w in which])[owners].astype(float)
    bw, bh = rng.uniform(0.02, 0.8, people) * W, rng.uniform(0.05, 0.95, people) * H
    x, y = rng.uniform(0, 1, people) * (W - bw), rng.uniform(0, 1, people) * (H - bh)
    crowd = rng.random(people) < 0.01
    no_keypoints = crowd | (rng.random(people) < 0.10)
    visibility = rng.choice([0, 1, 2], (people, 17), p=[0.3, 0.1, 0.6]) * ~no_keypoints[:, None]
    kx = (x[:, None] + rng.random((people, 17)) * bw[:, None]).astype(int) * (visibility > 0)
    ky = (y[:, None] + rng.random((people, 17)) * bh[:, None]).astype(int) * (visibility > 0)
    keypoints = np.stack([kx, ky, visibility], 2).reshape(people, 51).tolist()
    area = bw * bh * rng.uniform(0.4, 0.7, people)
    points = rng.integers(18, 30, people)
    annotations = []
    for j in range(people):
        if crowd[j]:
            segmentation = {"counts": rng.integers(0, 400, 60).tolist(), "size": [int(H[j]), int(W[j])]}
        else:
            angle = np.sort(rng.uniform(0, 2 * np.pi, points[j]))
            radius = rng.uniform(0.6, 1, points[j]) / 2
            polygon = np.stack([x[j] + bw[j] * (0.5 + np.cos(angle) * radius),
                                y[j] + bh[j] * (0.5 + np.sin(angle) * radius)], 1)
            segmentation = [np.round(polygon, 2).reshape(-1).tolist()]
        annotations.append({
            "segmentation": segmentation, "num_keypoints": int((visibility[j] > 0).sum()), "area": float(area[j]),
            "iscrowd": int(crowd[j]), "keypoints": keypoints[j], "image_id": ids[owners[j]],
            "bbox": [round(float(x[j]), 2), round(float(y[j]), 2), round(float(bw[j]), 2), round(float(bh[j]), 2)],
            "category_id": 1, "id": 100_000 + j})
    return {"info": {"description": "dist_kp COCO-scale benchmark", "year": 2017},
            "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": i, "name": "CC"}
                         for i in range(1, 9)],
            "images": images, "annotations": annotations,
            "categories": [{"supercategory": "person", "id": 1, "name": "person", "keypoints": COCO_KEYPOINT_NAMES,
                            "skeleton": COCO_SKELETON}]}


def photo_jpegs(out: Path, count: int = 64) -> list[str]:
    """640x480 JPEGs cut from a real photograph (matplotlib's sample), varied in crop, flip and tone."""
    import matplotlib
    from PIL import Image, ImageEnhance

    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    rng = np.random.default_rng(1)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for n in range(count):
        scale = rng.uniform(1.07, 1.6)
        big = photo.resize((int(640 * scale), int(640 * scale * photo.height / photo.width)), Image.BICUBIC)
        left, top = int(rng.integers(0, big.width - 640 + 1)), int(rng.integers(0, big.height - 480 + 1))
        image = big.crop((left, top, left + 640, top + 480))
        if n % 2:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.5, 1.5))
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
        name = f"{n * 5 + 9:012d}.jpg"
        image.save(out / name, format="JPEG", quality=95)
        names.append(name)
    return names


def prepare(work: Path) -> tuple[Path, Path, Path]:
    """(big annotation file, loader annotation file, loader image folder), generated once."""
    work.mkdir(parents=True, exist_ok=True)
    big = work / "person_keypoints_train_scale.json"
    if not big.exists():
        start = time.perf_counter()
        data = coco_scale_annotations()
        tmp = big.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(big)
        log.info("generated %s (%.0f MB) in %.0f s", big, big.stat().st_size / 1e6, time.perf_counter() - start)
    images = work / "images"
    small = work / "person_keypoints_loader.json"
    if not small.exists():
        photo_jpegs(images)
        data = coco_scale_annotations(64, 64, 160, sizes=((640, 480),), seed=2)
        small.write_text(json.dumps(data))
    return big, small, images


# ---------------------------------------------------------------- start-up variants (one per process)

def startup_reference(annotations: str) -> dict:
    """torchvision references/detection: COCO(), per-image filter, aspect-ratio groups."""
    import bisect
    import contextlib
    import io

    from pycocotools.coco import COCO

    gc.collect()
    base = _status_mb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(annotations)
    ids = sorted(coco.imgs.keys())

    def count_visible(anno: list) -> int:
        return sum(sum(1 for v in ann["keypoints"][2::3] if v > 0) for ann in anno)

    def valid(anno: list) -> bool:
        if len(anno) == 0 or all(any(o <= 1 for o in obj["bbox"][2:]) for obj in anno):
            return False
        return "keypoints" not in anno[0] or count_visible(anno) >= MIN_VISIBLE

    keep = [i for i, image_id in enumerate(ids)
            if valid([a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
                      if a["category_id"] in [1]])]
    ratios = [coco.imgs[ids[i]]["width"] / coco.imgs[ids[i]]["height"] for i in keep]
    bins = (2 ** np.linspace(-1, 1, 2 * 3 + 1)).tolist()
    groups = [bisect.bisect_right(sorted(bins), r) for r in ratios]
    elapsed = time.perf_counter() - start
    gc.collect()
    result = {"s": elapsed, "peak_mb": _status_mb("VmHWM") - base, "kept_mb": _status_mb("VmRSS") - base,
              "train_images": len(keep)}
    del coco, groups
    return result


def startup_cached(annotations: str, cache_dir: str) -> dict:
    """dist_kp: the node's index cache, the training positions and the grouped sampler of rank 3 of 8."""
    from dist_kp.data.coco import KeypointDataset
    from dist_kp.data.index_cache import cached_index
    from dist_kp.data.sampler import GroupedDistributedBatchSampler
    from dist_kp.storage import Storage

    gc.collect()
    base = _status_mb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    index = cached_index(annotations, Storage(), cache_dir, MIN_VISIBLE)
    dataset = KeypointDataset(index, "unused", Storage(), train=True, min_visible_keypoints=MIN_VISIBLE)
    sampler = GroupedDistributedBatchSampler(dataset.aspect_ratios, 2, num_replicas=8, rank=3)
    elapsed = time.perf_counter() - start
    gc.collect()
    result = {"s": elapsed, "peak_mb": _status_mb("VmHWM") - base, "kept_mb": _status_mb("VmRSS") - base,
              "train_images": len(dataset)}
    del sampler
    return result


def parse_only(annotations: str, how: str) -> dict:
    import orjson

    from dist_kp.data.coco_stream import index_from_stream

    gc.collect()
    base = _status_mb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    if how == "json":
        with open(annotations) as f:
            json.load(f)
    elif how == "orjson":
        with open(annotations, "rb") as f:
            orjson.loads(f.read())
    else:
        with open(annotations, "rb", buffering=0) as f:
            index_from_stream(lambda: f.read(16 << 20), annotations)
    return {"s": time.perf_counter() - start, "peak_mb": _status_mb("VmHWM") - base}


def same_as_json(annotations: str, cache_dir: str) -> dict:
    """The cached index equals json.load + index_from_coco at full scale (arrays and file names).

    Both feed index.IndexBuilder: this checks the streaming cut of the file into slices at COCO scale."""
    from dist_kp.data.coco import trainable_images
    from dist_kp.data.index import index_from_coco
    from dist_kp.data.index_cache import cached_index
    from dist_kp.storage import Storage

    index = cached_index(annotations, Storage(), cache_dir, MIN_VISIBLE)
    with open(annotations) as f:
        expected = index_from_coco(json.load(f), annotations)
    names = ("image_ids", "widths", "heights", "ann_offsets", "boxes", "keypoints", "iscrowd", "areas", "ann_ids")
    differ = [n for n in names if not (getattr(index, n).dtype == getattr(expected, n).dtype
                                       and np.array_equal(getattr(index, n), getattr(expected, n)))]
    if list(index.file_names) != expected.file_names:
        differ.append("file_names")
    if not np.array_equal(index.trainable[MIN_VISIBLE], trainable_images(expected, MIN_VISIBLE)):
        differ.append("trainable")
    return {"differ": differ}


# ---------------------------------------------------------------- one data-loading worker

class ReferenceDataset:
    """torchvision references/detection: CocoDetection + ConvertCocoPolysToMask + hflip, PILToTensor, float."""

    def __init__(self, annotations: str, images: str) -> None:
        import contextlib
        import io

        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(annotations)
        self.ids = sorted(self.coco.imgs.keys())
        self.images = images

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        import torch
        import torchvision.transforms.functional as F
        from PIL import Image
        from pycocotools import mask as coco_mask

        image_id = self.ids[i]
        info = self.coco.imgs[image_id]
        image = Image.open(f"{self.images}/{info['file_name']}").convert("RGB")
        anno = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id)) if a["iscrowd"] == 0]
        w, h = image.size
        boxes = torch.as_tensor([a["bbox"] for a in anno], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=w)
        boxes[:, 1::2].clamp_(min=0, max=h)
        masks = []
        for polygons in [a["segmentation"] for a in anno]:
            rles = coco_mask.frPyObjects(polygons, h, w)
            mask = torch.as_tensor(coco_mask.decode(rles), dtype=torch.uint8)
            masks.append((mask[..., None] if mask.ndim < 3 else mask).any(dim=2))
        masks = torch.stack(masks).to(torch.uint8) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
        keypoints = torch.as_tensor([a["keypoints"] for a in anno], dtype=torch.float32).reshape(len(anno), -1, 3)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {"boxes": boxes[keep], "labels": torch.ones(int(keep.sum()), dtype=torch.int64),
                  "masks": masks[keep], "image_id": image_id, "keypoints": keypoints[keep],
                  "area": torch.tensor([a["area"] for a in anno])[keep],
                  "iscrowd": torch.tensor([a["iscrowd"] for a in anno])[keep]}
        if np.random.default_rng([0, i]).random() < 0.5:  # RandomHorizontalFlip(p=0.5) on the PIL image
            image = F.hflip(image)
            target["boxes"][:, [0, 2]] = w - target["boxes"][:, [2, 0]]
            target["masks"] = target["masks"].flip(-1)
            flip_inds = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
            kps = target["keypoints"][:, flip_inds]
            kps[..., 0] = w - kps[..., 0]
            kps[kps[..., 2] == 0] = 0
            target["keypoints"] = kps
        image = F.pil_to_tensor(image)
        image = F.convert_image_dtype(image, torch.float)  # ToDtype(torch.float, scale=True)
        return image, target


def loader_rate(kind: str, annotations: str, images: str, passes: int, workers: int) -> dict:
    import torch

    torch.set_num_threads(1)
    if kind == "reference":
        dataset = ReferenceDataset(annotations, images)
        keys = list(range(len(dataset)))
        collate = lambda batch: tuple(zip(*batch))  # noqa: E731 - the reference's utils.collate_fn
    else:
        from dist_kp.data.coco import KeypointDataset, SampleKey, collate
        from dist_kp.data.index import load_index
        from dist_kp.storage import Storage

        dataset = KeypointDataset(load_index(annotations, Storage()), images, Storage(), train=True,
                                  min_visible_keypoints=0, hflip_prob=0.5)
        keys = [SampleKey(i, 0) for i in range(len(dataset))]
    for key in keys[:4]:
        dataset[key]  # warm up the decoders and the page cache
    if workers == 0:
        start = time.perf_counter()
        for _ in range(passes):
            for key in keys:
                dataset[key]
        return {"images_per_s": passes * len(keys) / (time.perf_counter() - start)}
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=[keys[i:i + 2] for i in range(0, len(keys), 2)] * passes, num_workers=workers,
        collate_fn=collate, prefetch_factor=4)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not part of the rate
    start = time.perf_counter()
    count = sum(len(images) for images, *_ in iterator)
    return {"images_per_s": count / (time.perf_counter() - start)}


# ---------------------------------------------------------------- driver

def child(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                         env=env, cwd=REPO, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_child(spec: list[str]) -> None:
    # Every variant imports the same libraries first, so "above imports" compares like with like.
    import orjson  # noqa: F401
    import pycocotools.coco  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import dist_kp.data.coco  # noqa: F401
    import dist_kp.data.index  # noqa: F401
    import dist_kp.data.index_cache  # noqa: F401
    import dist_kp.data.sampler  # noqa: F401

    what, *rest = spec
    if what == "reference":
        result = startup_reference(*rest)
    elif what == "cached":
        result = startup_cached(*rest)
    elif what == "parse":
        result = parse_only(*rest)
    elif what == "check":
        result = same_as_json(*rest)
    else:
        result = loader_rate(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]))
    print(json.dumps(result))


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/dist_kp_bench_index", help="generated data and the cache")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per start-up variant (median)")
    parser.add_argument("--passes", type=int, default=4, help="passes over the 64 images per loader measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(json.loads(args.child))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(args.work)
    big, small, images = prepare(work)
    cache = work / "cache"
    log.info("annotation file %s: %.0f MB; machine: %d cores, load average %.1f at start", big,
             big.stat().st_size / 1e6, os.cpu_count(), os.getloadavg()[0])

    rows: dict[str, list[dict]] = {"reference": [], "cold": [], "warm": []}
    for _ in range(args.repeats):
        rows["reference"].append(child(["reference", str(big)]))
        shutil.rmtree(cache, ignore_errors=True)
        rows["cold"].append(child(["cached", str(big), str(cache)]))
        rows["warm"].append(child(["cached", str(big), str(cache)]))
    counts = {k: {r["train_images"] for r in v} for k, v in rows.items()}
    if len(set().union(*counts.values())) != 1:
        raise RuntimeError(f"the variants keep different training images: {counts}")
    differ = child(["check", str(big), str(cache)])["differ"]
    if differ:
        raise RuntimeError(f"the cached index differs from json.load + index_from_coco in {differ}")
    log.info("the cached index equals json.load + index_from_coco on the whole file")
    parses = {how: [child(["parse", str(big), how]) for _ in range(args.repeats)] for how in ("json", "orjson", "stream")}

    ref_s, ref_peak, ref_kept = (median(rows["reference"], k) for k in ("s", "peak_mb", "kept_mb"))
    lines = ["", f"Start-up of one rank ({len(rows['reference'])} fresh processes each, median; "
             f"{next(iter(counts['reference']))} training images):", "",
             "| variant | time (s) | speed-up | peak RSS (MB) | % of ref peak | kept RSS (MB) | % of ref kept |",
             "|---|---|---|---|---|---|---|"]
    for name, label in (("reference", "reference: pycocotools COCO() + filter + groups"),
                        ("cold", "dist_kp cold (builder: hash + stream + write cache)"),
                        ("warm", "dist_kp warm (map the cache)")):
        s, peak, kept = (median(rows[name], k) for k in ("s", "peak_mb", "kept_mb"))
        lines.append(f"| {label} | {s:.2f} | {ref_s / s:.1f}x | {peak:.0f} | {100 * peak / ref_peak:.1f}% | "
                     f"{kept:.0f} | {100 * kept / ref_kept:.1f}% |")
    lines += ["", "JSON parse of the whole file (median):", "", "| parser | time (s) | peak RSS (MB) |", "|---|---|---|"]
    for how, label in (("json", "json.load"), ("orjson", "orjson.loads"),
                       ("stream", "dist_kp streaming build (orjson per 1 MB slice, columns)")):
        lines.append(f"| {label} | {median(parses[how], 's'):.2f} | {median(parses[how], 'peak_mb'):.0f} |")

    loader: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for kind in ("reference", "dist_kp"):
            for workers in (0, 1):
                loader.setdefault((kind, workers), []).append(
                    child(["loader", kind, str(small), str(images), str(args.passes), str(workers)])["images_per_s"])
    lines += ["", f"One data-loading worker, 64 photos 640x480, {args.passes} passes (median images/s):", "",
              "| pipeline | in the process | DataLoader, 1 worker |", "|---|---|---|"]
    for kind, label in (("reference", "reference: PIL decode + polygon masks + float on the CPU"),
                        ("dist_kp", "dist_kp: decode to uint8, no masks, flip on uint8")):
        a, b = statistics.median(loader[(kind, 0)]), statistics.median(loader[(kind, 1)])
        ra, rb = statistics.median(loader[("reference", 0)]), statistics.median(loader[("reference", 1)])
        lines.append(f"| {label} | {a:.0f} ({a / ra:.1f}x) | {b:.0f} ({b / rb:.1f}x) |")
    lines.append(f"\nload average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    log.info("\n".join(lines))


if __name__ == "__main__":
    main()
