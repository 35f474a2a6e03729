"""predict: the model rebuilt from its weights file alone, drawn pictures, a results JSON that evaluates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from subprocess import CompletedProcess

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_image

from dist_kp.config import load_config
from dist_kp.data.index import KeypointMeta
from dist_kp.model.keypoint_rcnn import build_model, weights_payload
from dist_kp.predict import draw_detections, load_predictor, plan_images, read_photo
from dist_kp.predict import main as predict_main
from tests.conftest import TINY_CONFIG, check, child_env, main_here, run_module, tiny_overrides

FIVE_KEYPOINTS = {"category_id": 3, "keypoint_names": ["head", "left_hand", "right_hand", "left_foot", "right_foot"],
                  "skeleton": [[1, 2], [1, 3], [1, 4], [4, 5]]}


@pytest.fixture(scope="module")
def five_keypoint_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights file of a custom 5-keypoint skeleton, written as training writes model_final.pt."""
    cfg = load_config(TINY_CONFIG, [])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("five") / "model_final.pt"
    torch.save(weights_payload(build_model(cfg.model, 5), cfg.model, FIVE_KEYPOINTS), path)
    return path


def predict(capfd: pytest.CaptureFixture, *args: str) -> CompletedProcess:
    """dist_kp.predict in this process (main_here)."""
    return main_here(predict_main, [*args, "--device", "cpu"], capfd)


def test_pictures_and_results_of_every_image_and_the_results_evaluate(
        tiny_model_final: Path, synthetic_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    val_images = sorted((synthetic_root / "val2017").glob("*.jpg"))
    out = tmp_path / "out"
    check(predict(capfd, "--weights", str(tiny_model_final), "--images", str(synthetic_root / "val2017"),
                  "--out", str(out), "--score-threshold", "0.05"))

    results = json.loads((out / "results.json").read_text())
    mapping = json.loads((out / "images.json").read_text())["images"]
    coco_ids = {int(p.stem) for p in val_images}  # COCO-style names: the number is the image id
    assert {entry["id"] for entry in mapping} == coco_ids
    assert results and {r["image_id"] for r in results} <= coco_ids
    assert all(len(r["keypoints"]) == 17 * 3 and len(r["bbox"]) == 4 and r["score"] >= 0.05 for r in results)
    for entry in mapping:
        source = decode_image(entry["source"])
        picture = decode_image(str(out / entry["picture"]))
        assert picture.shape == source.shape == (3, entry["height"], entry["width"])
        if any(r["image_id"] == entry["id"] for r in results):
            assert not torch.equal(picture, source), f"nothing drawn on {entry['picture']}"

    gt = synthetic_root / "annotations" / "person_keypoints_val2017.json"
    evaluated = check(run_module("dist_kp.evaluate", ["--annotations", str(gt), "--results", str(out / "results.json")]))
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"kp/AP", "bbox/AP"} <= metrics.keys(), evaluated.stderr[-2000:]


def test_missing_and_undecodable_images_are_named_and_the_others_done(
        tiny_model_final: Path, synthetic_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    good = sorted((synthetic_root / "val2017").glob("*.jpg"))[:2]
    shutil.copy(good[0], folder / "beach.jpg")
    shutil.copy(good[1], folder / "street.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "truncated.png").write_bytes((synthetic_root / "val2017" / good[0].name).read_bytes()[:200])
    (folder / "notes.txt").write_text("not an image and not asked for")
    missing = tmp_path / "missing.jpg"
    broken = tmp_path / "broken.jpg"  # named in the input list itself, not found in a folder
    broken.write_bytes(b"GIF89a not a jpeg either")
    out = tmp_path / "out"

    result = predict(capfd, "--weights", str(tiny_model_final), "--images", str(folder), str(missing), str(broken),
                     "--out", str(out), "--score-threshold", "0")

    assert result.returncode == 1, result.stderr[-3000:]
    for name in ("corrupt.jpg", "truncated.png", "missing.jpg", "broken.jpg"):
        assert any(name in line and "ERROR" in line for line in result.stderr.splitlines()), name
    assert "notes.txt" not in result.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["beach.png", "street.png"]
    mapping = {e["file_name"]: e["id"] for e in json.loads((out / "images.json").read_text())["images"]}
    # Names that are not numbers get ids 1..N in input order (folder contents sorted, then the missing file).
    assert mapping == {"beach.jpg": 1, "street.jpg": 3}
    assert {r["image_id"] for r in json.loads((out / "results.json").read_text())} <= {1, 3}


def test_custom_skeleton_weights_round_trip_and_predict_with_their_keypoints(
        five_keypoint_weights: Path, synthetic_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    model, meta = load_predictor(str(five_keypoint_weights), torch.device("cpu"))
    assert meta.to_dict() == FIVE_KEYPOINTS
    saved = torch.load(five_keypoint_weights, weights_only=True)["model"]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())

    out = tmp_path / "out"
    image = sorted((synthetic_root / "val2017").glob("*.jpg"))[0]
    check(predict(capfd, "--weights", str(five_keypoint_weights), "--images", str(image), "--out", str(out),
                  "--score-threshold", "0"))
    results = json.loads((out / "results.json").read_text())
    assert results, "an untrained model still returns low-scoring boxes at threshold 0"
    assert all(r["category_id"] == 3 and len(r["keypoints"]) == 5 * 3 for r in results)
    assert (out / f"{image.stem}.png").exists()


def test_pictures_join_exactly_the_pairs_of_the_stored_skeleton() -> None:
    meta = KeypointMeta(**FIVE_KEYPOINTS)
    points = torch.tensor([[[50.0, 20, 1], [20, 60, 1], [80, 60, 1], [40, 100, 1], [60, 100, 1]]])
    output = {"boxes": torch.tensor([[5.0, 5, 95, 115]]), "keypoints": points, "scores": torch.tensor([0.9])}

    picture = draw_detections(torch.zeros(3, 120, 100, dtype=torch.uint8), output, meta)

    def lit(a: int, b: int) -> bool:
        x, y = ((points[0, a, :2] + points[0, b, :2]) / 2).round().int().tolist()
        return bool(picture[:, y - 1:y + 2, x - 1:x + 2].any())

    assert all(lit(a - 1, b - 1) for a, b in FIVE_KEYPOINTS["skeleton"])
    assert not lit(1, 2) and not lit(2, 4), "hands are not joined to each other or to a foot in this skeleton"


def test_image_ids_are_coco_numbers_when_every_name_is_one_else_input_order() -> None:
    coco = plan_images(["a/000000000139.jpg", "b/000000397133.png"])
    assert [(i.image_id, i.picture) for i in coco] == [(139, "000000000139.png"), (397133, "000000397133.png")]
    mixed = plan_images(["x/17.jpg", "y/17.jpg", "y/17_1.jpg", "y/cat.jpg"])
    assert [i.image_id for i in mixed] == [1, 2, 3, 4]
    assert len({i.picture for i in mixed}) == 4, "the same file name in two folders gets two pictures"


def test_a_file_without_model_config_and_skeleton_is_refused_with_exit_2(tmp_path: Path,
                                                                          capfd: pytest.CaptureFixture) -> None:
    cfg = load_config(TINY_CONFIG, [])
    bare = tmp_path / "state_dict.pt"
    torch.save(build_model(cfg.model, 17).state_dict(), bare)
    for weights, message in ((bare, "not a dist_kp weights file"), (tmp_path / "absent.pt", "weights file not found")):
        result = predict(capfd, "--weights", str(weights), "--images", str(tmp_path), "--out", str(tmp_path / "out"))
        assert result.returncode == 2 and message in result.stderr and str(weights) in result.stderr, result.stderr


def test_16_bit_pngs_are_read_as_8_bit_pictures(tmp_path: Path) -> None:
    depth = (np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)
    Image.fromarray(depth).save(tmp_path / "scan.png")
    image = read_photo(str(tmp_path / "scan.png"), upright=True)
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40) and int(image.max()) > 200


def test_phone_photos_are_turned_upright_by_their_exif_orientation_unless_asked_not_to(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    Image.new("RGB", (40, 20), (200, 30, 30)).save(tmp_path / "phone.jpg", exif=exif)
    assert read_photo(str(tmp_path / "phone.jpg"), upright=True).shape == (3, 40, 20)
    assert read_photo(str(tmp_path / "phone.jpg"), upright=False).shape == (3, 20, 40)


def test_weights_images_and_output_on_s3(s3_server, five_keypoint_weights: Path, synthetic_root: Path) -> None:
    bucket = s3_server.create_bucket("predict")
    fs = s3_server.filesystem()
    fs.put(str(five_keypoint_weights), f"{bucket}/run/model_final.pt")
    images = sorted((synthetic_root / "val2017").glob("*.jpg"))[:2]
    for image in images:
        fs.put(str(image), f"{bucket}/photos/{image.name}")

    args = ["--weights", f"s3://{bucket}/run/model_final.pt", "--images", f"s3://{bucket}/photos/",
            "--out", f"s3://{bucket}/predictions", "--score-threshold", "0", "--device", "cpu"]
    check(run_module("dist_kp.predict", args, env=child_env(**s3_server.env())))

    fs.invalidate_cache()
    written = sorted(name.rsplit("/", 1)[1] for name in fs.ls(f"{bucket}/predictions"))
    assert written == sorted([*(f"{image.stem}.png" for image in images), "images.json", "results.json"])
    mapping = json.loads(fs.cat(f"{bucket}/predictions/images.json"))["images"]
    assert [entry["source"] for entry in mapping] == [f"s3://{bucket}/photos/{image.name}" for image in images]
