"""Export a trained model for deployment: ONNX (fixed input size) or TorchScript, plus a JSON sidecar.

usage:
  python -m dist_kp.export --weights OUTPUT_DIR/model_final.pt --out model.onnx [--size H W]
  python -m dist_kp.export --weights OUTPUT_DIR/model_final.pt --out model.pt --format torchscript

ONNX: one input `image`, float32 [3, H, W], RGB in [0, 1], of exactly the size given by --size
(default: the model's own test size, min_size[-1] x max_size); the graph normalises and resizes
like the eager model and returns `boxes` [N, 4] (x1, y1, x2, y2 in input pixels), `labels` [N],
`scores` [N], `keypoints` [N, K, 3] (x, y, 1) and `keypoints_scores` [N, K]. It is written by
PyTorch's TorchScript-based exporter (opset 17): the torch.export-based one stops at
torchvision's data-dependent NMS. TorchScript: the scripted model takes a list of [3, H, W]
images of any size and returns (losses, detections), as torchvision's scripted detection models do;
it calls torchvision's operators (torchvision::nms, roi_align), which exist only once torchvision is
imported: load it with `dist_kp.export.load_torchscript(path)`, or `import torchvision` before
`torch.jit.load(path)`. OUT.json (beside OUT) holds the keypoint names, skeleton, category id, input
and preprocessing. --weights is model_final.pt, model_best.pt or a training checkpoint; --out may be
an fsspec URL. Exit status: 0 written, 2 unusable weights or arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import logging
import sys
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torchvision  # noqa: F401 - registers torchvision::nms and roi_align, which a TorchScript model calls
from torchvision.models.detection import KeypointRCNN

from dist_kp import distributed
from dist_kp.cli import as_process
from dist_kp.data.index import KeypointMeta
from dist_kp.predict import PredictError, load_predictor
from dist_kp.storage import Storage, StorageError

log = logging.getLogger("dist_kp.export")

# export has no run config: storage options (endpoint, credentials) come from the environment.
STORAGE = Storage()

ONNX_OPSET = 17
OUTPUT_NAMES = ["boxes", "labels", "scores", "keypoints", "keypoints_scores"]
# How a deployment loads each format (in the sidecar and the log).
LOADING = {
    "onnx": "onnxruntime.InferenceSession(path).run(None, {'image': float32 array [3, H, W], RGB in [0, 1]})",
    "torchscript": "dist_kp.export.load_torchscript(path), or `import torchvision` (it registers torchvision::nms "
                   "and roi_align, which the model calls) before torch.jit.load(path)",
}


class ExportError(ValueError):
    """A model or arguments export cannot use; the message names the problem and the file."""


def default_size(model: KeypointRCNN) -> tuple[int, int]:
    """The largest landscape picture the model takes without shrinking it: min_size[-1] x max_size."""
    return int(model.transform.min_size[-1]), int(model.transform.max_size)


def sidecar(model: KeypointRCNN, meta: KeypointMeta, fmt: str, model_file: str, size: tuple[int, int] | None,
            weights: str) -> dict[str, Any]:
    """What a deployment needs besides the model file: skeleton, input and preprocessing, outputs."""
    transform = model.transform
    height_width = list(size) if size else None
    return {
        "format": fmt,
        "model_file": model_file,
        "onnx_opset": ONNX_OPSET if fmt == "onnx" else None,
        "keypoints": {"category_id": meta.category_id, "names": meta.keypoint_names, "skeleton": meta.skeleton,
                      "flip_permutation": meta.flip_permutation},
        "input": {"name": "image" if fmt == "onnx" else "images (list of tensors)",
                  "shape": [3, *height_width] if height_width else [3, "H", "W"], "dtype": "float32",
                  "layout": "CHW", "channels": "RGB", "range": [0.0, 1.0]},
        "preprocessing": (
            "decode to RGB, resize or pad to the input's height and width (ONNX: the size is fixed), convert to "
            "float32 and divide by 255; the model itself normalises with mean/std and resizes so the short side "
            "is min_size (long side at most max_size), and returns coordinates in input pixels"),
        "normalize": {"mean": list(transform.image_mean), "std": list(transform.image_std)},
        "resize": {"min_size": int(transform.min_size[-1]), "max_size": int(transform.max_size)},
        "outputs": {
            "boxes": "float32 [N, 4]: x1, y1, x2, y2 in input pixels",
            "labels": "int64 [N]: 1 = the keypoint category",
            "scores": "float32 [N]: detection score, sorted high to low",
            "keypoints": "float32 [N, K, 3]: x, y, 1 in input pixels, K in the order of keypoints.names",
            "keypoints_scores": "float32 [N, K]: heatmap logit of each keypoint",
        },
        "score_threshold": float(model.roi_heads.score_thresh),
        "detections_per_image": int(model.roi_heads.detections_per_img),
        "load": LOADING[fmt],
        "source_weights": weights,
        "versions": {name: _version(name) for name in ("dist_kp", "torch", "torchvision")},
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def export_onnx(model: KeypointRCNN, size: tuple[int, int]) -> bytes:
    """The model as ONNX bytes for one [3, H, W] image (the legacy exporter, see the module docstring)."""
    example = torch.rand(3, *size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        # The tracer's warnings are about torchvision's own code paths (torch.tensor copies, constant shapes
        # of the fixed input): known and harmless for a fixed size, and hundreds of lines long.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script. is deprecated", category=FutureWarning)
        path = Path(folder) / "model.onnx"
        torch.onnx.export(model, ([example],), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=OUTPUT_NAMES, do_constant_folding=True)
        return path.read_bytes()


def export_torchscript(model: KeypointRCNN) -> bytes:
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, which cannot take this model yet (see above).
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+. is deprecated", category=FutureWarning)
        scripted = torch.jit.script(model)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def load_torchscript(path: str, map_location: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """A TorchScript model written by export (local path or fsspec URL), in eval mode.

    The same as torch.jit.load, with torchvision imported first: torchvision registers the
    operators the model calls (torchvision::nms, roi_align), and torch.jit.load fails without them.
    Call it as model([image, ...]) with float32 [3, H, W] RGB images in [0, 1]; it returns
    (losses, detections), detections one dict per image (boxes, labels, scores, keypoints, keypoints_scores).
    """
    with STORAGE.open(path, "rb") as f:
        data = io.BytesIO(f.read())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load. is deprecated", category=FutureWarning)
        return torch.jit.load(data, map_location=map_location).eval()


def export(weights: str, out: str, fmt: str = "onnx", size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Write OUT (the model) and OUT.json (the sidecar); returns the sidecar."""
    try:
        model, meta = load_predictor(weights, torch.device("cpu"), command="export", store=STORAGE)
    except PredictError as error:
        raise ExportError(str(error)) from None
    if fmt == "onnx":
        if importlib.util.find_spec("onnx") is None:
            raise ExportError("ONNX export needs the onnx package: pip install 'dist_kp[export]' (or onnx)")
        size = size or default_size(model)
        if min(size) < 32:
            raise ExportError(f"--size {size[0]} {size[1]}: height and width must be at least 32 pixels")
        data = export_onnx(model, size)
    else:
        size = None
        data = export_torchscript(model)
    info = sidecar(model, meta, fmt, out.rstrip("/").rsplit("/", 1)[-1], size, weights)
    STORAGE.write(out, data)
    STORAGE.write(f"{out}.json", json.dumps(info, indent=2).encode())
    log.info("%s model (%.1f MB) written to %s, sidecar %s.json; load it with %s", fmt, len(data) / 1e6, out, out,
             LOADING[fmt])
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dist-kp export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="OUTPUT_DIR/model_final.pt, model_best.pt or a checkpoint "
                        "(checkpoints/step_N or its state.pt): local path or fsspec URL")
    parser.add_argument("--out", required=True, help="model file to write, e.g. model.onnx (local path or URL)")
    parser.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="default: onnx")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="ONNX input height and width (default: min_size[-1] max_size of the model)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    distributed.setup_logging()
    args = parse_args(argv)
    if args.size and args.format != "onnx":
        log.error("--size applies to --format onnx only (TorchScript takes any size)")
        return 2
    try:
        export(args.weights, args.out, args.format, tuple(args.size) if args.size else None)
    except (ExportError, StorageError) as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(as_process(main))
