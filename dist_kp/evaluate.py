"""Evaluate a model, or a results file from any tool, with COCO keypoint (OKS) and box metrics.

usage:
  python -m dist_kp.evaluate --config CONFIG.yaml --weights PATH_OR_URL [section.key=value ...]
  torchrun --nproc_per_node=N -m dist_kp.evaluate --config CONFIG.yaml --weights PATH_OR_URL
  python -m dist_kp.evaluate --annotations GT.json --results RESULTS.json [--backend B] [--sigmas S ...]
      [--keypoint-area keypoints|box] [--out DIR]

With --config, the validation set of the config is evaluated (output under OUTPUT_DIR/eval/).
--weights is model_final.pt or model_best.pt, a training checkpoint (OUTPUT_DIR/checkpoints/step_N
or its state.pt), or a bare state dict. A dist_kp file records its model config: the network is
built from it and every tensor comes from the file (no backbone weights file is read); the config
supplies the data and eval settings, and a model key it sets that changes the network (backbone,
head sizes, sizes) to another value than the file's is refused by name. A bare state dict is built
from the config's model section.
With --results, box stats are computed only when the results carry boxes; metrics.json is
written next to the results file, or under --out. A results file that COCO evaluation cannot
take (unknown image ids, non-finite scores, keypoint lists of the wrong length, not JSON) is
refused with the file, the first bad record and the rule.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import orjson

from dist_kp import storage
from dist_kp.cli import as_process
from dist_kp.config import ConfigError, load_config
from dist_kp.data.index import DataError, load_index
from dist_kp.evaluation.backends import BACKENDS, KEYPOINT_AREAS
from dist_kp.evaluation.results import EvaluationError, check_results, ground_truth
from dist_kp.evaluation.results_file import evaluate_results
from dist_kp.model.errors import WeightsError
from dist_kp.storage.run_folder import RunFolder

log = logging.getLogger("dist_kp.evaluate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dist-kp evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("evaluate a model on the config's validation set")
    model.add_argument("--config", help="YAML config: its data and eval sections are used; its model section must "
                       "agree with the weights file's")
    model.add_argument("--weights", help="model_final.pt, model_best.pt, a checkpoint (checkpoints/step_N or its "
                       "state.pt) or a state dict: local path or fsspec URL")
    files = parser.add_argument_group("evaluate a COCO results file")
    files.add_argument("--annotations", help="ground-truth COCO keypoints JSON (path or URL)")
    files.add_argument("--results", help="COCO results JSON: image_id, category_id, keypoints, score[, bbox]")
    files.add_argument("--out", help="folder for metrics.json (default: next to the results)")
    files.add_argument("--keypoint-area", choices=KEYPOINT_AREAS,
                       help="detection area for kp/APm, kp/APl: the keypoints' extent (COCO's protocol, default) or "
                       "the box (detectron2's); with --config use eval.keypoint_area=...")
    parser.add_argument("--backend", choices=BACKENDS, help="evaluation backend (default: the config's, or faster_coco_eval)")
    parser.add_argument("--sigmas", type=float, nargs="+",
                        help="OKS sigma per keypoint, the true sigma (COCO nose 0.026, not pycocotools' x10 source "
                        "form .26); default: COCO's 17")
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value (with --config)")
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.results):
        parser.error("give either --config with --weights, or --annotations with --results")
    if args.config and not args.weights:
        parser.error("--config needs --weights")
    if args.results and not args.annotations:
        parser.error("--results needs --annotations")
    if args.config and args.keypoint_area:
        parser.error("--keypoint-area goes with --results; with --config give eval.keypoint_area=...")
    return args


def read_results(url: str, store: storage.Storage) -> Any:
    """The parsed results JSON; a missing, binary or malformed file is an EvaluationError naming it."""
    try:
        with store.open(url, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise EvaluationError(f"results file not found: {url}") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass  # not strict JSON: Python's json also reads NaN/Infinity (json.dump writes them), then names the record
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise EvaluationError(
            f"{url} is not a JSON text file (byte {error.start} is not UTF-8: a binary file?)") from None
    except json.JSONDecodeError as error:
        raise EvaluationError(f"{url} is not valid JSON: {error}") from None


def output_folder(args: argparse.Namespace, store: storage.Storage) -> str:
    """The folder for metrics.json, created before the evaluation runs (a file in the way is named)."""
    folder = args.out or (args.results.rsplit("/", 1)[0] if "/" in args.results else ".")
    fs, path = store.url_to_fs(folder)
    try:
        fs.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        raise EvaluationError(f"--out {folder} cannot be a folder: a file is in the way ({error.strerror}: "
                              f"{error.filename or path})") from None
    return folder


def evaluate_file(args: argparse.Namespace) -> None:
    # Not distributed.setup_logging: that imports torch, which a results file's evaluation never needs.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = storage.Storage()  # no config here: default options, credentials from the environment
    folder = output_folder(args, store)
    index = load_index(args.annotations, store)
    results = read_results(args.results, store)
    check_results(results, args.results, set(index.image_ids.tolist()), index.meta.category_id,
                  index.meta.num_keypoints, args.annotations)
    iou_types = ("keypoints", "bbox") if all("bbox" in r for r in results) else ("keypoints",)
    output = evaluate_results(ground_truth(index), results, args.backend or "faster_coco_eval", args.sigmas, iou_types,
                              args.keypoint_area or "keypoints")
    fs, path = store.url_to_fs(folder)
    with fs.open(f"{path}/metrics.json", "w") as f:
        json.dump(output.metrics, f, indent=1)
    log.info("%d results on %d images:\n%s\nmetrics written to %s/metrics.json", len(results), len(index),
             output.summary, folder)


def evaluate_weights(args: argparse.Namespace) -> None:
    # Imported here: they import torch (seconds and a GB), which evaluate_file does without.
    from dist_kp import distributed
    from dist_kp.data.loaders import val_index
    from dist_kp.evaluation.evaluator import Evaluator
    from dist_kp.model.keypoint_rcnn import read_weights_file
    from dist_kp.model.trained import trained_model

    distributed.setup_logging()
    overrides = list(args.overrides)
    if args.backend:
        overrides.append(f"eval.backend={args.backend}")
    if args.sigmas:
        overrides.append(f"eval.sigmas={list(args.sigmas)}")
    try:
        cfg = load_config(args.config, overrides)
        info = distributed.init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
        store = storage.Storage.from_config(cfg.storage)
        index = val_index(cfg, store)
        model = trained_model(read_weights_file(args.weights, store), cfg.model, index.meta.keypoint_names).model
        model.to(info.device)
        Evaluator(cfg, index, RunFolder(cfg.output_dir, store), info.device).run(model, step=0)
    finally:
        distributed.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        evaluate_file(args) if args.results else evaluate_weights(args)
    except (ConfigError, DataError, EvaluationError, WeightsError) as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(as_process(main))
