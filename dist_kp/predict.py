"""Run a trained model on your own pictures: drawn people plus one COCO results JSON.

usage:
  python -m dist_kp.predict --weights OUTPUT_DIR/model_final.pt --images a.jpg b.png DIR/ --out OUT \
      [--score-threshold 0.5] [--device auto|cpu|cuda]

The weights file (model_final.pt, written at the end of training; model_best.pt; or a training
checkpoint, OUTPUT_DIR/checkpoints/step_N or its state.pt) carries the model config, keypoint names
and skeleton, so no training config is needed and a custom skeleton is drawn right. A folder given
in --images contributes its .jpg/.jpeg/.png/.webp files (not sub-folders).
OUT receives, for every readable input, NAME.png with boxes, keypoints and skeleton drawn;
results.json (COCO results: image_id, category_id, bbox, keypoints, score) for all inputs; and
images.json, the COCO "images" list mapping each image id to its source file. Image ids are the
file names' numbers when every name is a number (COCO style, 000000397133.jpg), else 1, 2, ...
in input order. Detections scoring below --score-threshold are neither drawn nor written (use a
low threshold, e.g. 0.05, for a results file meant for evaluation). Photos are turned upright as
their EXIF orientation says, unless --ignore-exif.

Exit status: 0 all inputs done; 1 some inputs missing or undecodable (named in the log; the
others are done); 2 unusable weights, device, output folder or arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_image, encode_png
from torchvision.models.detection import KeypointRCNN
from torchvision.transforms.v2.functional import to_dtype

from dist_kp import distributed
from dist_kp.cli import as_process
from dist_kp.data.index import KeypointMeta
from dist_kp.evaluation.results import outputs_to_results
from dist_kp.model.keypoint_rcnn import WeightsError, WeightsFile, read_weights_file
from dist_kp.model.trained import trained_model
from dist_kp.storage import Storage, StorageError
from dist_kp.tracking.pictures import draw_people, skeleton_connectivity

log = logging.getLogger("dist_kp.predict")

# predict has no run config: storage options (endpoint, credentials) come from the environment.
STORAGE = Storage()
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class PredictError(ValueError):
    """Weights, device or arguments predict cannot use; the message names the problem and the source."""


@dataclass
class InputImage:
    """One picture to run on: where it comes from, its image id and the name of its drawn picture."""

    source: str
    image_id: int
    picture: str


def load_predictor(weights: str, device: torch.device, command: str = "predict",
                   store: Storage | None = None) -> tuple[KeypointRCNN, KeypointMeta]:
    """The model rebuilt from a trained weights file alone (model config, keypoints, state dict), in eval mode.

    weights: model_final.pt or model_best.pt, or a training checkpoint (its state.pt or its
    checkpoints/step_N folder). `command` names the command in error messages.
    """
    try:
        file = read_weights_file(weights, store or STORAGE)
    except WeightsError as error:
        raise PredictError(str(error)) from None
    if file.model_config is None or file.keypoints is None:
        raise PredictError(_not_trained_message(file, command))
    try:
        meta = KeypointMeta(int(file.keypoints["category_id"]), list(file.keypoints["keypoint_names"]),
                            [list(pair) for pair in file.keypoints["skeleton"]],
                            file.keypoints.get("flip_pairs"))  # absent in files of earlier versions
        skeleton_connectivity(meta.skeleton, meta.num_keypoints)
    except (KeyError, TypeError, ValueError) as error:
        raise PredictError(f"{weights}: unusable keypoints: {error}") from None
    try:
        model = trained_model(file).model
    except WeightsError as error:
        raise PredictError(str(error)) from None
    return model.to(device), meta


def _not_trained_message(file: WeightsFile, command: str) -> str:
    if file.checkpoint:
        return (f"{file.source} is a training checkpoint written before dist_kp recorded the keypoint names and "
                f"skeleton in checkpoints, which {command} needs: use the run's model_final.pt or model_best.pt, "
                "or evaluate the checkpoint (python -m dist_kp.evaluate --config ... --weights ...)")
    missing = [key for key, value in (("model_config", file.model_config), ("keypoints", file.keypoints))
               if value is None]
    return (f"{file.source} is not a dist_kp weights file: no {missing} in it; {command} needs the "
            "OUTPUT_DIR/model_final.pt (or model_best.pt, or a checkpoint) that training writes (it holds the "
            "model config and skeleton)")


def _name(source: str) -> str:
    return PurePosixPath(source.rstrip("/")).name


def gather_inputs(arguments: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image sources from files and folders (in the order given, each once), and the arguments that failed."""
    sources: list[str] = []
    failed: list[tuple[str, str]] = []
    for argument in arguments:
        try:
            fs, path = STORAGE.url_to_fs(argument)
            if not fs.isdir(path):
                sources.append(argument)
                continue
            found = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                failed.append((argument, f"folder has no {'/'.join(IMAGE_SUFFIXES)} files"))
            # A listing drops the protocol (s3://); local paths stay plain paths.
            sources += [fs.unstrip_protocol(p) if "://" in argument else p for p in found]
        except Exception as error:  # noqa: BLE001 - one bad argument must not stop the others
            failed.append((argument, f"{type(error).__name__}: {error}"))
    return list(dict.fromkeys(sources)), failed


def read_photo(url: str, upright: bool) -> torch.Tensor:
    """A uint8 RGB tensor [3, H, W]; `upright` turns it as its EXIF orientation says (phone photos)."""
    with STORAGE.open(url, "rb") as f:
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    image = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=upright)
    return to_dtype(image, torch.uint8, scale=True)  # 16-bit PNGs decode as uint16


def plan_images(sources: list[str]) -> list[InputImage]:
    """Image ids (the file names' numbers when all are distinct numbers, else 1..N) and unique picture names."""
    stems = [PurePosixPath(_name(s)).stem for s in sources]
    numbers = [int(stem) if stem.isdigit() else None for stem in stems]
    coco_style = all(n is not None for n in numbers) and len(set(numbers)) == len(numbers)
    ids = numbers if coco_style else list(range(1, len(sources) + 1))
    planned, used = [], set()
    for source, stem, image_id in zip(sources, stems, ids):
        picture, n = f"{stem}.png", 1
        while picture in used:  # the same file name in two folders
            picture, n = f"{stem}_{n}.png", n + 1
        used.add(picture)
        planned.append(InputImage(source, int(image_id), picture))
    return planned


@torch.no_grad()
def detect(model: KeypointRCNN, image: torch.Tensor, device: torch.device, score_threshold: float) -> dict[str, torch.Tensor]:
    """The model's people in one uint8 image, those scoring at least score_threshold, on the CPU."""
    output = model([image.to(device).float().div_(255.0)])[0]
    keep = output["scores"] >= score_threshold
    return {key: value[keep].cpu() for key, value in output.items()}


def draw_detections(image: torch.Tensor, output: dict[str, torch.Tensor], meta: KeypointMeta) -> torch.Tensor:
    """The picture of one image's detections with the weights' own skeleton."""
    return draw_people(image, output["boxes"], output["keypoints"], meta.skeleton, output["scores"])


def run(args: argparse.Namespace) -> int:
    """Predict on every input; returns the exit status (0 all done, 1 some inputs failed)."""
    device = distributed.pick_device(args.device)
    model, meta = load_predictor(args.weights, device)
    log.info("model from %s: %d keypoints, %d skeleton limbs, device %s", args.weights, meta.num_keypoints,
             len(meta.skeleton), device)
    sources, failed = gather_inputs(args.images)
    for source, reason in failed:
        log.error("skipped %s: %s", source, reason)
    out = args.out.rstrip("/")
    with STORAGE.named_errors(out):
        fs, path = STORAGE.url_to_fs(out)
        fs.makedirs(path, exist_ok=True)
    records: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    for item in plan_images(sources):
        try:
            image = read_photo(item.source, upright=not args.ignore_exif)
        except Exception as error:  # noqa: BLE001 - decoders raise RuntimeError, OSError, ...
            reason = "file not found" if isinstance(error, FileNotFoundError) else \
                f"cannot decode: {type(error).__name__}: {error}"
            log.error("skipped %s: %s", item.source, reason)
            failed.append((item.source, reason))
            continue
        output = detect(model, image, device, args.score_threshold)
        records += outputs_to_results([output], [item.image_id], meta.category_id)
        STORAGE.write(f"{out}/{item.picture}", encode_png(draw_detections(image, output, meta)).numpy().tobytes())
        images.append({"id": item.image_id, "file_name": _name(item.source), "width": int(image.shape[2]),
                       "height": int(image.shape[1]), "source": item.source, "picture": item.picture})
        log.info("%s (image_id %d): %d people -> %s/%s", item.source, item.image_id, len(output["scores"]), out,
                 item.picture)
    STORAGE.write(f"{out}/results.json", json.dumps(records).encode())
    STORAGE.write(f"{out}/images.json", json.dumps({"images": images}, indent=1).encode())
    log.info("%d images, %d people (score >= %g); pictures, results.json and images.json in %s", len(images),
             len(records), args.score_threshold, out)
    if failed:
        log.error("%d inputs failed: %s", len(failed), ", ".join(source for source, _ in failed))
    return 1 if failed else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dist-kp predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="model_final.pt, model_best.pt or a checkpoint (checkpoints/"
                        "step_N or its state.pt): local path or fsspec URL")
    parser.add_argument("--images", required=True, nargs="+", help="image files and folders (paths or URLs)")
    parser.add_argument("--out", required=True, help="folder for the pictures, results.json and images.json")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="keep people scoring at least this (default 0.5)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the GPU when there is one (default)")
    parser.add_argument("--ignore-exif", action="store_true",
                        help="use the pixels as stored, not turned upright by the EXIF orientation (as training "
                             "reads images: for results compared with annotations made on stored pixels)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.score_threshold <= 1.0:
        parser.error(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    return args


def main(argv: list[str] | None = None) -> int:
    distributed.setup_logging()
    args = parse_args(argv)
    try:
        return run(args)
    except (PredictError, StorageError, distributed.LaunchError) as error:
        log.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(as_process(main))
