"""Training throughput of dist_kp's GPU-side options against a plain PyTorch loop, and a CUDA correctness pass
(issue 23 item 2). One GPU, a few minutes:

    python bench/bench_gpu.py --out bench_gpu.json            # CUDA: R50-FPN, 640-800 / 1333, COCO-size JPEGs
    python bench/bench_gpu.py --dry-run --out dry.json        # CPU: the same matrix on the tiny config (~2 min)

Every row trains `--steps` timed steps after `--warmup` untimed ones, on generated JPEGs (the
synthetic set drawn 4x larger: 640x480, 480x640, 640x640 ... as COCO's) and reports images/s,
the step's time split into data wait (the host waiting for the next batch on the device),
forward, backward and optimizer (the step's CUDA stream synchronised at each boundary), and
peak GPU memory. Rows:
  baseline   the reference scripts' loop: a default DataLoader (shuffled, no aspect-ratio groups)
             whose workers each decode one image with PIL and turn it into a float tensor with
             torchvision transforms (flip included), `model(images, targets)`, backward, plain SGD;
  dist_kp    dist_kp's loader, model and optimizer with every option of issue 23 off (its defaults);
  all        every option on but compile (and foreach, which fused replaces);
  <option>   each option alone, and all+compile, at the larger batch in bf16; the compile rows
             run last, after the correctness pass (a dry run skips them: minutes on a CPU).
Each row's ratio is to the baseline of the same batch and precision, measured in this run. The
JSON is rewritten after every row; --rows NAME ... reruns some of them.
The model is built by dist_kp.model.build_model from the config (the defaults are torchvision's
keypointrcnn_resnet50_fpn), with random weights: nothing is downloaded.

The correctness pass runs the real commands in this process on the same data: train 20 steps
(--correctness-steps) in bf16 with every option but compile on (checkpoints at steps 10 and 20),
resume a second run from step 10 to 20 and compare the weights bit for bit (on CUDA RoIAlign's
backward adds with atomics, so a difference there is reported, not hidden), then evaluate,
predict and export the final weights.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import logging
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's dist_kp is the one measured, whatever is installed

from dist_kp.config import load_config
from dist_kp.data.device_batches import DeviceBatches
from dist_kp.data.loaders import build_train_loader, train_index
from dist_kp.data.synthetic import generate
from dist_kp.engine.schedule import build_optimizer
from dist_kp.model.execution import apply_execution_options
from dist_kp.model.keypoint_rcnn import build_model
from dist_kp.model.precision import autocast, grad_scaler
from dist_kp.storage import Storage
from dist_kp.storage.run_folder import checkpoint_name

log = logging.getLogger("bench_gpu")

# Each option of issue 23 item 1 as the override that turns it on.
OPTIONS = {
    "channels_last": "train.channels_last=true",
    "cudnn_benchmark": "train.cudnn_benchmark=true",
    "foreach_sgd": "optim.implementation=foreach",
    "fused_sgd": "optim.implementation=fused",
    "decode_device": "data.decode=device",
    "prefetch": "data.prefetch=true",
    "compile_backbone": "train.compile=backbone",
}
# "all": every option but foreach (fused replaces it) and compile, which is measured alone and in "all+compile"
# (its first steps of each input shape compile: one row of it at a time keeps the run within minutes).
ALL_OPTIONS = [o for name, o in OPTIONS.items() if name not in ("foreach_sgd", "compile_backbone")]
# torch.compile of the tiny backbone did not finish its first step in 8 minutes on a shared 2-core CPU.
COMPILE_NOT_IN_DRY_RUN = "skipped in a dry run: compiling on the CPU takes minutes (measured on CUDA only)"
COLUMNS = ("name", "batch", "precision", "images_per_s", "ratio_to_baseline", "data_ms", "forward_ms",
           "backward_ms", "optimizer_ms", "step_ms", "peak_memory_mb")


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # baseline | dist_kp
    batch: int
    precision: str
    overrides: tuple[str, ...] = ()


@dataclass
class Sizes:
    """What a run measures on: the config, the generated images, the steps, the loader workers."""

    config: Path
    overrides: tuple[str, ...]
    scale: int  # generated images are the synthetic set's drawn this many times larger
    train_images: int
    batches: tuple[int, int]
    warmup: int
    steps: int
    workers: int


def sizes(dry_run: bool, steps: int | None, warmup: int | None) -> Sizes:
    if dry_run:
        return Sizes(REPO / "configs/synthetic_cpu.yaml", ("train.device=cpu",), 1, 24, (2, 4),
                     warmup if warmup is not None else 1, steps or 2, 1)
    # The reference recipe's sizes (640-800 shorter side, 1333 max) from its config, random weights.
    return Sizes(REPO / "configs/coco_kp_r50_fpn.yaml",
                 ("train.device=cuda", "model.backbone_weights=null", "model.weights=null", "tracking.mode=disabled",
                  "data.min_visible_keypoints=5"),
                 4, 256, (2, 8), warmup if warmup is not None else 5, steps or 15, 8)


def matrix(batches: tuple[int, int]) -> list[Setting]:
    """Baseline, dist_kp defaults and all options at both batches in fp32 and bf16; each option alone, and all
    of them with compile, at the larger batch in bf16."""
    rows = []
    for batch in batches:
        for precision in ("fp32", "bf16"):
            rows += [Setting("baseline", "baseline", batch, precision),
                     Setting("dist_kp", "dist_kp", batch, precision),
                     Setting("all", "dist_kp", batch, precision, tuple(ALL_OPTIONS))]
    rows += [Setting(name, "dist_kp", batches[-1], "bf16", (override,)) for name, override in OPTIONS.items()]
    rows.append(Setting("all+compile", "dist_kp", batches[-1], "bf16", (*ALL_OPTIONS, OPTIONS["compile_backbone"])))
    return rows


def coco_size_dataset(root: Path, train: int, scale: int) -> Path:
    """The synthetic set (dist_kp.data.synthetic) with images and annotations `scale` times larger."""
    generate(root, train=train, val=8, seed=0)
    if scale == 1:
        return root
    for split in ("train", "val"):
        for path in (root / f"{split}2017").glob("*.jpg"):
            with Image.open(path) as image:
                image.resize((image.width * scale, image.height * scale), Image.BILINEAR).save(path, quality=90)
        annotations = root / "annotations" / f"person_keypoints_{split}2017.json"
        data = json.loads(annotations.read_text())
        for image in data["images"]:
            image["width"] *= scale
            image["height"] *= scale
        for ann in data["annotations"]:
            ann["bbox"] = [v * scale for v in ann["bbox"]]
            ann["area"] *= scale * scale
            ann["keypoints"] = [v * scale if k % 3 != 2 else v for k, v in enumerate(ann["keypoints"])]
            if "segmentation" in ann and isinstance(ann["segmentation"], list):
                ann["segmentation"] = [[v * scale for v in poly] for poly in ann["segmentation"]]
        annotations.write_text(json.dumps(data))
    return root


# ---- the baseline: the reference scripts' dataset, loader and loop ----

FLIP_INDS = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]  # references/detection/transforms.py


class ReferenceDataset(torch.utils.data.Dataset):
    """One PIL-decoded image per item, turned into a float tensor with torchvision transforms, randomly flipped
    with its boxes and keypoints, as references/detection's CocoDetection + transforms do."""

    def __init__(self, root: Path) -> None:
        data = json.loads((root / "annotations/person_keypoints_train2017.json").read_text())
        by_image: dict[int, list[dict]] = {}
        for ann in data["annotations"]:
            if not ann.get("iscrowd", 0):
                by_image.setdefault(ann["image_id"], []).append(ann)
        self.images = [(root / "train2017" / image["file_name"], by_image[image["id"]])
                       for image in data["images"] if image["id"] in by_image]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        path, anns = self.images[i]
        image = F.to_dtype(F.pil_to_tensor(Image.open(path).convert("RGB")), torch.float32, scale=True)
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        keypoints = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(len(anns), -1, 3)
        if random.random() < 0.5:
            width = image.shape[-1]
            image = F.horizontal_flip(image)
            boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
            keypoints = keypoints[:, FLIP_INDS]
            keypoints[..., 0] = width - keypoints[..., 0]
            keypoints[keypoints[..., 2] == 0] = 0
        return image, {"boxes": boxes, "labels": torch.ones(len(anns), dtype=torch.int64), "keypoints": keypoints}


def reference_collate(batch: list[Any]) -> tuple[Any, ...]:
    return tuple(zip(*batch))


def reference_batches(dataset: ReferenceDataset, batch: int, workers: int, device: torch.device
                      ) -> Iterator[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], int]]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         collate_fn=reference_collate, drop_last=True)
    while True:
        for images, targets in loader:
            yield ([image.to(device) for image in images],
                   [{k: v.to(device) for k, v in t.items()} for t in targets], 0)


# ---- one measured row ----

@dataclass
class Row:
    name: str
    batch: int
    precision: str
    overrides: list[str]
    images_per_s: float = 0.0
    ratio_to_baseline: float | None = None
    data_ms: float = 0.0
    forward_ms: float = 0.0
    backward_ms: float = 0.0
    optimizer_ms: float = 0.0
    step_ms: float = 0.0
    peak_memory_mb: float = 0.0
    seconds: float = 0.0  # the row's wall time: building, warmup and timed steps
    error: str | None = None


class PhaseClock:
    """Seconds of each phase of a step, the step's CUDA stream synchronised at every boundary."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, list[float]] = {}
        self.last = 0.0

    def start(self) -> None:
        self._sync()
        self.last = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":  # the step's stream only: a prefetch on the side stream goes on
            torch.cuda.current_stream(self.device).synchronize()

    def lap(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.seconds.setdefault(phase, []).append(now - self.last)
        self.last = now


def forever(batches: DeviceBatches, sampler: Any) -> Iterator[Any]:
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from batches
        epoch += 1


def measure(step_source: Iterator[Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, precision: str, device: torch.device, warmup: int, steps: int,
            clip: float | None) -> dict[str, list[float]]:
    """Train warmup + steps steps; the timed steps' phases."""
    model.train()
    clock = PhaseClock(device)
    for step in range(warmup + steps):
        if step == warmup:
            clock.seconds.clear()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        clock.start()
        images, targets, _ = next(step_source)
        clock.lap("data")
        with autocast(precision, device):
            losses = model(images, targets)
        loss = sum(losses.values())
        clock.lap("forward")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        clock.lap("backward")
        if clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        clock.lap("optimizer")
    return clock.seconds


def run_row(setting: Setting, size: Sizes, root: Path, cache: Path) -> Row:
    row = Row(setting.name, setting.batch, setting.precision, list(setting.overrides))
    cfg = load_config(size.config, [*size.overrides, f"data.root={root}", f"data.cache_dir={cache}",
                                    f"train.batch_size={setting.batch}", f"train.precision={setting.precision}",
                                    f"train.workers={size.workers}", *setting.overrides])
    device = torch.device(cfg.train.device)
    torch.manual_seed(0)
    random.seed(0)
    store = Storage.from_config(cfg.storage)
    index = train_index(cfg, store)
    model = build_model(cfg.model, index.meta.num_keypoints, store).to(device)
    if setting.kind == "baseline":
        torch.backends.cudnn.benchmark = False
        source = reference_batches(ReferenceDataset(root), setting.batch, size.workers, device)
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr, momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay)
        clip = None
    else:
        apply_execution_options(model, cfg.train, device)
        loader, sampler = build_train_loader(cfg, index, 0, 1, device, store)
        source = forever(DeviceBatches(loader, device, cfg.data.prefetch), sampler)
        optimizer = build_optimizer(model, cfg)
        clip = cfg.optim.clip_grad_norm
    scaler = grad_scaler(setting.precision, device)
    try:
        phases = measure(source, model, optimizer, scaler, setting.precision, device, size.warmup, size.steps, clip)
    finally:
        with contextlib.suppress(Exception):
            source.close()
    step_seconds = [sum(parts) for parts in zip(*phases.values(), strict=True)]
    row.images_per_s = setting.batch * len(step_seconds) / sum(step_seconds)
    for phase in ("data", "forward", "backward", "optimizer"):
        setattr(row, f"{phase}_ms", 1000 * float(np.mean(phases[phase])))
    row.step_ms = 1000 * float(np.mean(step_seconds))
    if device.type == "cuda":
        row.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def release_memory() -> None:
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def with_ratios(rows: list[Row]) -> list[Row]:
    base = {(r.batch, r.precision): r.images_per_s for r in rows if r.name == "baseline" and not r.error}
    for r in rows:
        reference = base.get((r.batch, r.precision))
        r.ratio_to_baseline = r.images_per_s / reference if reference and not r.error else None
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        status = "" if not r.error else " (skipped)" if r.error.startswith("skipped") else f" (failed: {r.error[:60]})"
        values = [r.name + status, r.batch, r.precision,
                  f"{r.images_per_s:.1f}", "-" if r.ratio_to_baseline is None else f"{r.ratio_to_baseline:.2f}x",
                  f"{r.data_ms:.1f}", f"{r.forward_ms:.1f}", f"{r.backward_ms:.1f}", f"{r.optimizer_ms:.1f}",
                  f"{r.step_ms:.1f}", f"{r.peak_memory_mb:.0f}"]
        lines.append("| " + " | ".join(str(v) for v in values) + " |")
    return "\n".join(lines)


# ---- the correctness pass: dist_kp's own commands ----

def weights_difference(a: Path, b: Path) -> dict[str, Any]:
    first = torch.load(a, map_location="cpu", weights_only=True)["model"]
    second = torch.load(b, map_location="cpu", weights_only=True)["model"]
    differ = [k for k in first if not torch.equal(first[k], second[k])]
    largest = max(((first[k].float() - second[k].float()).abs().max().item() for k in differ), default=0.0)
    return {"bit_exact": not differ, "tensors_differing": len(differ), "of_tensors": len(first),
            "max_abs_difference": largest, "first_differing": differ[:5]}


def correctness_pass(size: Sizes, root: Path, work: Path, device: torch.device, steps: int) -> dict[str, Any]:
    """Train `steps` steps (checkpoints at steps / 2 and steps), resume a second run from the half, compare."""
    from dist_kp import evaluate, export, predict, train

    config = str(size.config)
    options = ["train.batch_size=2", "train.precision=bf16", *ALL_OPTIONS]
    common = [*size.overrides, f"data.root={root}", f"data.cache_dir={work / 'cache'}", *options,
              f"train.workers={min(size.workers, 2)}", "eval.every_epochs=0", "eval.at_end=false",
              f"checkpoint.every_steps={steps // 2}", f"train.log_every={steps // 2}"]
    result: dict[str, Any] = {"options": options}

    def command(name: str, main: Callable[[list[str]], int], argv: list[str]) -> None:
        start = time.perf_counter()
        try:
            status = main(argv)
        except Exception as error:  # noqa: BLE001 - recorded, the pass goes on
            status = f"{type(error).__name__}: {error}"
        result[name] = {"exit_status": status, "seconds": round(time.perf_counter() - start, 1)}

    first, second = work / "run_a", work / "run_b"
    command("train", train.main, ["--config", config, *common, f"output_dir={first}", f"train.max_steps={steps}"])
    command("resume_from_half", train.main, ["--config", config, *common, f"output_dir={second}",
                                             f"train.max_steps={steps}",
                                             f"checkpoint.resume={first / 'checkpoints' / checkpoint_name(steps // 2)}"])
    result["steps"] = steps
    final_a, final_b = first / "model_final.pt", second / "model_final.pt"
    if final_a.is_file() and final_b.is_file():
        result["resume"] = weights_difference(final_a, final_b)
        if not result["resume"]["bit_exact"] and device.type == "cuda":
            result["resume"]["why"] = ("CUDA kernels that add with atomics (torchvision's RoIAlign backward, "
                                       "index_add in the losses) sum in a varying order; the CPU pass is bit-exact")
    command("evaluate", evaluate.main, ["--config", config, "--weights", str(final_a), *common,
                                        f"output_dir={first}", "eval.max_images=8"])
    command("predict", predict.main, ["--weights", str(final_a), "--images", str(root / "val2017"),
                                      "--out", str(work / "predict"), "--device", device.type,
                                      "--score-threshold", "0.05"])
    fmt = "onnx" if importlib.util.find_spec("onnx") else "torchscript"
    command(f"export_{fmt}", export.main, ["--weights", str(final_a), "--out", str(work / f"model.{fmt}"),
                                           "--format", fmt])
    metrics = sorted((first / "eval").glob("*/metrics.json"))
    if metrics:
        result["evaluate"]["metrics"] = json.loads(metrics[-1].read_text())
    return result


def timed_row(setting: Setting, size: Sizes, root: Path, cache: Path, dry_run: bool) -> Row:
    """run_row, or the reason it did not run; with its wall time."""
    log.info("row %s batch %d %s %s", setting.name, setting.batch, setting.precision, " ".join(setting.overrides))
    started = time.perf_counter()
    if dry_run and OPTIONS["compile_backbone"] in setting.overrides:
        return Row(setting.name, setting.batch, setting.precision, list(setting.overrides), error=COMPILE_NOT_IN_DRY_RUN)
    try:
        row = run_row(setting, size, root, cache)
    except Exception as error:  # noqa: BLE001 - one failing option must not lose the others' numbers
        log.exception("row %s failed", setting.name)
        row = Row(setting.name, setting.batch, setting.precision, list(setting.overrides),
                  error=f"{type(error).__name__}: {error}")
    release_memory()
    row.seconds = round(time.perf_counter() - started, 1)
    return row


def summary(report: dict[str, Any], rows: list[Row]) -> dict[str, Any]:
    """The report with the rows so far, their ratios and the fastest dist_kp row."""
    report["rows"] = [asdict(r) for r in with_ratios(rows)]
    measured = [r for r in rows if not r.error and r.name != "baseline"]
    best = max(measured, key=lambda r: r.images_per_s, default=None)
    report["best"] = None if best is None else {"name": best.name, "batch": best.batch, "precision": best.precision,
                                                 "images_per_s": best.images_per_s,
                                                 "ratio_to_baseline": best.ratio_to_baseline}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the whole matrix on the CPU with the tiny config")
    parser.add_argument("--steps", type=int, help="timed steps per row (default: 15 on CUDA, 2 in a dry run)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 5 on CUDA, 1 in a dry run)")
    parser.add_argument("--rows", nargs="+", metavar="NAME", help="only these rows (baseline, dist_kp, all, "
                        f"all+compile, {', '.join(OPTIONS)}); default: every row")
    parser.add_argument("--out", default="bench_gpu.json", help="JSON file of the rows and the correctness pass "
                        "(rewritten after every row: a run cut short keeps what it measured)")
    parser.add_argument("--skip-correctness", action="store_true", help="measure the rows only")
    parser.add_argument("--correctness-steps", type=int, default=20, help="training steps of the correctness pass "
                        "(even: the second run resumes from the half; default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("dist_kp").setLevel(logging.WARNING)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --dry-run for the CPU rehearsal")
    size = sizes(args.dry_run, args.steps, args.warmup)
    device = torch.device("cpu" if args.dry_run else "cuda")
    started = time.perf_counter()
    out = Path(args.out)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dry_run": args.dry_run, "torch": torch.__version__, "config": str(size.config.relative_to(REPO)),
        "warmup_steps": size.warmup, "timed_steps": size.steps, "loader_workers": size.workers,
    }
    rows: list[Row] = []
    settings = [s for s in matrix(size.batches) if not args.rows or s.name in args.rows]
    compiled = [s for s in settings if OPTIONS["compile_backbone"] in s.overrides]
    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp:
        root = coco_size_dataset(Path(tmp) / "data", size.train_images, size.scale)

        def measure_rows(chosen: list[Setting]) -> None:
            for setting in chosen:
                rows.append(timed_row(setting, size, root, Path(tmp) / "cache", args.dry_run))
                out.write_text(json.dumps(summary(report, rows), indent=2, default=str))

        measure_rows([s for s in settings if s not in compiled])
        if not args.skip_correctness:
            report["correctness"] = correctness_pass(size, root, Path(tmp) / "correctness", device,
                                                     args.correctness_steps)
        measure_rows(compiled)  # last: their compile time must not cost the other numbers if the run is cut short
    report["seconds"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(summary(report, rows), indent=2, default=str))
    print(table(rows))
    print(json.dumps({k: report[k] for k in ("device", "best", "seconds")}, default=str))
    if "correctness" in report:
        print(json.dumps(report["correctness"], indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
