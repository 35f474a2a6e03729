"""Export: the ONNX model (onnxruntime, CPU) and the TorchScript model give the eager model's outputs."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import decode_image
from torchvision.ops import box_iou
from torchvision.transforms.v2.functional import resize, to_dtype

from dist_kp.config import load_config
from dist_kp.data.synthetic import COCO_KEYPOINT_NAMES, COCO_SKELETON
from dist_kp.export import load_torchscript
from dist_kp.export import main as export_main
from dist_kp.model.keypoint_rcnn import build_model, weights_payload
from dist_kp.predict import load_predictor
from tests.conftest import REPO, TINY_CONFIG, check, run_module

import onnxruntime as ort  # noqa: E402 - part of the dev extra: the test runs wherever the suite does

SIZE = (480, 640)  # a camera picture, not the tiny training size
# Tolerances of the exported models against eager PyTorch on the same pictures (measured: ~1e-3 px, ~1e-5).
BOX_PX, SCORE, KEYPOINT_PX, KEYPOINT_SCORE = 0.05, 1e-4, 0.05, 1e-2
# An argmax between two heatmap cells of nearly equal value may land on the other cell.
KEYPOINTS_WITHIN = 0.99


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model's model_final.pt; no detection cap, so the detections are those above the score threshold.

    Resized to 128-192: TorchScript's resize computes its scale in float32, and at some sizes its picture is
    a pixel smaller than eager PyTorch's (300x400 at min_size 96: 95x127 against 96x128), which changes the
    detections of this untrained model; at 128 every picture of these tests resizes alike."""
    cfg = load_config(TINY_CONFIG, ["model.box_detections_per_img=100", "model.min_size=[128]",
                                    "model.max_size=192"]).model
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export") / "model_final.pt"
    meta = {"category_id": 1, "keypoint_names": COCO_KEYPOINT_NAMES, "skeleton": COCO_SKELETON}
    torch.save(weights_payload(build_model(cfg, 17), cfg, meta), path)
    return path


@pytest.fixture(scope="module")
def pictures(synthetic_root: Path) -> list[torch.Tensor]:
    """Four validation pictures at camera size, float RGB in [0, 1] as the exported model takes them."""
    files = sorted((synthetic_root / "val2017").iterdir())[:4]
    return [resize(to_dtype(decode_image(str(f)), torch.float32, scale=True), list(SIZE)) for f in files]


def assert_same_detections(eager: dict[str, torch.Tensor], exported: dict[str, torch.Tensor]) -> None:
    assert len(eager["boxes"]) > 0, "the comparison needs detections"
    assert exported["boxes"].shape == eager["boxes"].shape
    # Pair by box (two nearly equal scores may come out in the other order).
    iou = box_iou(eager["boxes"], exported["boxes"])
    pair = iou.argmax(1)
    assert torch.all(iou.max(1).values > 0.999) and len(set(pair.tolist())) == len(pair)
    assert torch.allclose(exported["boxes"][pair], eager["boxes"], atol=BOX_PX, rtol=0)
    assert torch.allclose(exported["scores"][pair], eager["scores"], atol=SCORE, rtol=0)
    assert torch.equal(exported["labels"][pair], eager["labels"])
    offset = (exported["keypoints"][pair][..., :2] - eager["keypoints"][..., :2]).abs().amax(-1)
    assert (offset <= KEYPOINT_PX).float().mean() >= KEYPOINTS_WITHIN, offset.max()
    close = offset <= KEYPOINT_PX
    assert torch.allclose(exported["keypoints_scores"][pair][close], eager["keypoints_scores"][close],
                          atol=KEYPOINT_SCORE, rtol=0)


def test_onnx_export_matches_the_eager_model_on_camera_size_pictures_in_onnxruntime(
        weights: Path, pictures: list[torch.Tensor], tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    check(run_module("dist_kp.export", ["--weights", str(weights), "--out", str(out), "--size", *map(str, SIZE)]))
    info = json.loads((tmp_path / "model.onnx.json").read_text())
    assert info["keypoints"]["names"] == COCO_KEYPOINT_NAMES and info["keypoints"]["skeleton"] == COCO_SKELETON
    assert info["input"]["shape"] == [3, *SIZE] and info["input"]["range"] == [0.0, 1.0]
    assert info["normalize"]["mean"] == [0.485, 0.456, 0.406] and info["resize"] == {"min_size": 128, "max_size": 192}

    model, _ = load_predictor(str(weights), torch.device("cpu"))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("image", [3, *SIZE])]
    names = [o.name for o in session.get_outputs()]
    assert names == ["boxes", "labels", "scores", "keypoints", "keypoints_scores"]
    for picture in pictures:
        with torch.no_grad():
            eager = model([picture])[0]
        exported = dict(zip(names, (torch.from_numpy(np.asarray(a)) for a in
                                    session.run(None, {"image": picture.numpy()}))))
        assert_same_detections(eager, exported)


def test_torchscript_export_matches_the_eager_model_at_any_size(
        weights: Path, pictures: list[torch.Tensor], tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    assert export_main(["--weights", str(weights), "--out", str(out), "--format", "torchscript"]) == 0
    assert json.loads((tmp_path / "model.pt.json").read_text())["input"]["shape"] == [3, "H", "W"]
    model, _ = load_predictor(str(weights), torch.device("cpu"))
    scripted = load_torchscript(str(out))
    other_size = resize(pictures[0], [300, 400])
    for picture in (pictures[1], other_size):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="RCNN always returns a", category=UserWarning)
            eager, exported = model([picture])[0], scripted([picture])[1][0]
        assert_same_detections(eager, exported)


def test_export_of_a_file_that_is_not_a_dist_kp_weights_file_is_refused(
        tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    bare = tmp_path / "bare.pt"
    torch.save(build_model(load_config(TINY_CONFIG).model, 17).state_dict(), bare)
    assert export_main(["--weights", str(bare), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capfd.readouterr().err
    assert "bare.pt is not a dist_kp weights file" in err
    assert "export needs the OUTPUT_DIR/model_final.pt" in err and "predict" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_the_readme_export_examples_run_onnxruntime_and_torchscript(
        weights: Path, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Export\n", 1)[1].split("\n## ", 1)[0]
    examples = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(examples) == 2 and "onnxruntime" in examples[0] and "load_torchscript" in examples[1]
    (tmp_path / "runs/demo").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/synthetic").symlink_to(synthetic_root)
    for out, fmt in (("model.onnx", "onnx"), ("model.pt", "torchscript")):
        assert export_main(["--weights", str(weights), "--out", str(tmp_path / "runs/demo" / out), "--format", fmt]) == 0
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="RCNN always returns a", category=UserWarning)
        for example in examples:
            exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) > 1 and "nose" in printed[0], printed[:2]  # one line per detection, then the shapes
    assert printed[-1].startswith("torch.Size([") and printed[-1].endswith(", 17, 3])")
