"""The node's index cache: same samples as the JSON, one builder per node, rebuilt when stale or damaged."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from dist_kp.config import load_config
from dist_kp.data.coco import KeypointDataset, SampleKey, build_target, trainable_images
from dist_kp.data.coco_stream import index_from_stream
from dist_kp.data.index import DataError, KeypointIndex, KeypointMeta, index_from_coco
from dist_kp.data.index_cache import cached_index
from dist_kp.data.loaders import build_train_loader, train_index
from dist_kp.data.synthetic import COCO_KEYPOINT_NAMES, COCO_SKELETON, generate
from dist_kp.evaluation.results import ground_truth
from dist_kp.storage import Storage
from tests.conftest import REPO, TINY_CONFIG, check, child_env, run_module, tiny_overrides

ARRAYS = ("image_ids", "widths", "heights", "ann_offsets", "boxes", "keypoints", "iscrowd", "areas", "ann_ids")
BUILDER = "building index cache"


def reference(path: Path) -> KeypointIndex:
    """The index of a valid file written out from its definition, one record at a time: images by id,
    person annotations by (image, id), missing keypoints as zeros, a missing area as the box's."""
    data = json.loads(path.read_text())
    person = next(c for c in data["categories"] if c.get("name") == "person")
    num_kp = len(person["keypoints"])
    images = sorted(data["images"], key=lambda im: im["id"])
    position = {im["id"]: i for i, im in enumerate(images)}
    anns = sorted((a for a in data["annotations"] if a.get("category_id") == person["id"]),
                  key=lambda a: (position[a["image_id"]], a.get("id", 0)))
    counts = np.bincount(np.array([position[a["image_id"]] for a in anns], np.int64), minlength=len(images))
    return KeypointIndex(
        source=str(path),
        meta=KeypointMeta(person["id"], person["keypoints"], person.get("skeleton", [])),
        image_ids=np.array([im["id"] for im in images], np.int64),
        file_names=[im["file_name"] for im in images],
        widths=np.array([im["width"] for im in images], np.int32),
        heights=np.array([im["height"] for im in images], np.int32),
        ann_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        boxes=np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4),
        keypoints=np.array([a.get("keypoints") or [0] * 3 * num_kp for a in anns], np.float64).reshape(-1, num_kp, 3),
        iscrowd=np.array([a.get("iscrowd", 0) for a in anns], np.uint8),
        areas=np.array([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], np.float64),
        ann_ids=np.array([a.get("id", j) for j, a in enumerate(anns)], np.int64),
    )


def from_json(path: Path) -> KeypointIndex:
    """The index built straight from the JSON (json.load + index_from_coco)."""
    return index_from_coco(json.loads(path.read_text()), str(path))


def assert_same_index(index, expected) -> None:
    for name in ARRAYS:
        a, b = np.asarray(getattr(index, name)), np.asarray(getattr(expected, name))
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True), name
    assert list(index.file_names) == list(expected.file_names)
    assert index.meta == expected.meta


def assert_same_target(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def visible_enough(index, i: int, min_visible: int) -> bool:
    """The training filter written out from its definition, one image at a time."""
    target = build_target(index, i, train=True)
    return len(target["boxes"]) > 0 and int((target["keypoints"][..., 2] > 0).sum()) >= min_visible


def read_from_stream(path: Path, block: int = 4096):
    with open(path, "rb") as f:
        return index_from_stream(lambda: f.read(block), str(path))


@pytest.fixture(scope="module")
def edge_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated data whose every 4th image adds a crowd region, a person without keypoints and a zero-width box."""
    return generate(tmp_path_factory.mktemp("edge"), train=24, val=8, seed=5, edge_cases=True)


def builder_lines(caplog: pytest.LogCaptureFixture) -> int:
    return sum(BUILDER in r.getMessage() for r in caplog.records)


def test_every_training_and_eval_target_from_the_cache_equals_the_json(edge_root: Path, tmp_path: Path) -> None:
    for split in ("train", "val"):
        path = edge_root / "annotations" / f"person_keypoints_{split}2017.json"
        expected = reference(path)
        assert_same_index(from_json(path), expected)
        index = cached_index(str(path), Storage(), tmp_path / "cache", min_visible_keypoints=10)
        assert index.cache_path and isinstance(index.keypoints, np.memmap)
        assert_same_index(index, expected)
        assert index.iscrowd.any() and (index.boxes[:, 2] == 0).any()  # the edge cases are there
        for i in range(len(index)):
            for train in (True, False):
                assert_same_target(build_target(index, i, train), build_target(expected, i, train))
        for min_visible in (0, 1, 10, 17, 40):
            wanted = [i for i in range(len(expected)) if visible_enough(expected, i, min_visible)]
            assert trainable_images(expected, min_visible).tolist() == wanted
            cached = cached_index(str(path), Storage(), tmp_path / "cache", min_visible)
            assert cached.trainable[min_visible].tolist() == wanted
        np.testing.assert_array_equal(index.aspect_ratios, expected.aspect_ratios)
        images = str(edge_root / f"{split}2017")
        options = {"train": True, "min_visible_keypoints": 10, "hflip_prob": 0.5, "seed": 3}
        cached_set = KeypointDataset(index, images, Storage(), **options)
        json_set = KeypointDataset(expected, images, Storage(), **options)
        assert len(cached_set) == len(json_set) > 0
        for item in range(len(cached_set)):
            (a_image, a_target, _), (b_image, b_target, _) = cached_set[SampleKey(item, 1)], json_set[SampleKey(item, 1)]
            assert torch.equal(a_image, b_image)
            assert_same_target(a_target, b_target)
        # Evaluation ground truth comes from the same index: equal to the one of the JSON.
        assert ground_truth(index) == ground_truth(expected)


def irregular_file(tmp_path: Path) -> Path:
    """Valid COCO that takes every slow path: float and missing keypoints, multi-polygons, RLE, nested
    'keypoints', strings that look like separators, unicode names, other categories, categories first."""
    people = []
    for j in range(40):
        ann = {"id": 500 - j, "image_id": [7, 3, 9][j % 3], "category_id": 1, "iscrowd": 0,
               "bbox": [j * 0.5, 2.25, 30.0 + j, 40.125], "area": 1.5 * j,
               "segmentation": [[1, 2, 3, 4, 5, 6]] if j % 2 else [[1.5, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]],
               "keypoints": [v for k in range(17) for v in (10 + k + 0.25 * (j % 4), 20.0 + k, 2 * (k % 2))]}
        if j % 5 == 1:
            del ann["keypoints"]  # index_from_coco: zeros
        if j % 7 == 2:
            ann["keypoints"] = [int(v) for v in ann["keypoints"]] if "keypoints" in ann else []
        if j % 9 == 3:
            ann["extra"] = {"keypoints": [1, 2, 3], "note": 'looks like "keypoints": [1, 2] and }, {'}
        if j % 11 == 4:
            del ann["area"], ann["iscrowd"]
        if j % 6 == 5:
            ann.update(iscrowd=1, segmentation={"counts": [0, 12, 3], "size": [80, 100]})
        people.append(ann)
    others = [{"id": 900, "image_id": 3, "category_id": 2, "bbox": "not checked", "keypoints": "x"}]
    data = {
        "categories": [{"id": 2, "name": "dog"},
                       {"id": 1, "name": "person", "keypoints": COCO_KEYPOINT_NAMES, "skeleton": COCO_SKELETON}],
        "info": {"description": "irregular ] } {", "nested": [{"a": [1, {"b": "}]"}]}]},
        "images": [{"id": 9, "file_name": "ünïcode ] }, {.jpg", "width": 50, "height": 40},
                   {"id": 7, "file_name": "a.jpg", "width": 100.0, "height": 80},
                   {"id": 3, "file_name": "b.jpg", "width": 60, "height": 90}],
        "annotations": people[:20] + others + people[20:],
        "licenses": [],
    }
    path = tmp_path / "irregular.json"
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    return path


def test_streaming_parse_equals_json_load_for_irregular_but_valid_files(tmp_path: Path, edge_root: Path) -> None:
    path = irregular_file(tmp_path)
    expected = reference(path)
    assert_same_index(from_json(path), expected)
    for block in (7, 4096, 1 << 24):  # reads that cut records anywhere
        assert_same_index(read_from_stream(path, block), expected)
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(json.loads(path.read_text()), separators=(",", ":")))
    assert_same_index(read_from_stream(compact), reference(compact))
    edge = edge_root / "annotations" / "person_keypoints_train2017.json"
    assert_same_index(read_from_stream(edge, 100), reference(edge))
    assert_same_index(from_json(edge), reference(edge))


def test_bad_files_are_refused_naming_the_file_and_record(tmp_path: Path) -> None:
    data = json.loads(irregular_file(tmp_path).read_text())
    cases = {
        "not COCO": ({"images": []}, r"bad\.json: not a COCO annotation file \(missing list 'annotations'\)"),
        "keypoint count": (None, r"annotation id=500 has 3 keypoint values, expected 51"),
        "unknown image": (None, r"annotation id=499 refers to image_id=12345 which is not in 'images'"),
    }
    for name, (content, message) in cases.items():
        if content is None:
            content = json.loads(json.dumps(data))
            person = [a for a in content["annotations"] if a["id"] == {"keypoint count": 500, "unknown image": 499}[name]][0]
            if name == "keypoint count":
                person["keypoints"] = [1, 2, 2]
            else:
                person["image_id"] = 12345
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(content))
        with pytest.raises(DataError, match=message):
            read_from_stream(bad)
        with pytest.raises(DataError, match=message):
            from_json(bad)
    bad.write_text('{"images": [{"id": 1, "file_name": "a.jpg", "width": 3, "height": 4}], "annotations": [')
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        cached_index(str(bad), Storage(), tmp_path / "cache")
    with pytest.raises(DataError, match="annotation file not found: .*missing.json"):
        cached_index(str(tmp_path / "missing.json"), Storage(), tmp_path / "cache")


def test_changed_json_gets_a_new_entry_and_a_touched_one_keeps_its_entry(
        synthetic_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "dist_kp.data.index_cache")
    path = tmp_path / "train.json"
    data = json.loads((synthetic_root / "annotations" / "person_keypoints_train2017.json").read_text())
    path.write_text(json.dumps(data))
    first = cached_index(str(path), Storage(), tmp_path / "cache", 10)
    assert builder_lines(caplog) == 1
    again = cached_index(str(path), Storage(), tmp_path / "cache", 10)
    assert again.cache_path == first.cache_path and builder_lines(caplog) == 1
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # same bytes, new mtime: hashed, not rebuilt
    assert cached_index(str(path), Storage(), tmp_path / "cache", 10).cache_path == first.cache_path
    assert builder_lines(caplog) == 1
    data["annotations"][0]["keypoints"][0] += 1.0
    path.write_text(json.dumps(data))
    changed = cached_index(str(path), Storage(), tmp_path / "cache", 10)
    assert builder_lines(caplog) == 2 and changed.cache_path != first.cache_path
    assert_same_index(changed, reference(path))
    assert Path(first.cache_path).is_dir()  # the old entry stays for jobs still mapping it


def test_truncated_or_damaged_cache_is_rebuilt(synthetic_root: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "dist_kp.data.index_cache")
    path = synthetic_root / "annotations" / "person_keypoints_train2017.json"
    expected = reference(path)
    entry = Path(cached_index(str(path), Storage(), tmp_path / "cache", 10).cache_path)
    damage = [
        lambda: (entry / "keypoints.npy").write_bytes((entry / "keypoints.npy").read_bytes()[:-100]),
        lambda: (entry / "manifest.json").write_text('{"format": 1, "arr'),
        lambda: (entry / "file_name_bytes.npy").unlink(),
        lambda: (entry / "trainable-min10.npy").write_bytes(b"\x93NUMPY garbage"),
    ]
    for n, harm in enumerate(damage, start=2):
        harm()
        index = cached_index(str(path), Storage(), tmp_path / "cache", 10)
        assert_same_index(index, expected)
        assert index.trainable[10].tolist() == [i for i in range(len(expected)) if visible_enough(expected, i, 10)]
    # The damaged trainable file alone is rewritten; the three damaged entries were rebuilt.
    assert builder_lines(caplog) == 4


def test_file_without_annotations_or_trainable_images_gives_an_empty_index(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 3}],
                                "annotations": [], "categories": [{"id": 1, "name": "person",
                                                                   "keypoints": COCO_KEYPOINT_NAMES}]}))
    for _ in range(2):  # built, then mapped
        index = cached_index(str(path), Storage(), tmp_path / "cache", 10)
        assert_same_index(index, reference(path))
        assert len(index) == 1 and len(index.boxes) == 0 and index.trainable[10].tolist() == []


def test_cached_index_pickles_as_a_reference_to_its_files(synthetic_root: Path, tmp_path: Path) -> None:
    path = synthetic_root / "annotations" / "person_keypoints_train2017.json"
    index = cached_index(str(path), Storage(), tmp_path / "cache", 10)
    payload = pickle.dumps(index)
    assert len(payload) < 2000  # workers started by spawn/forkserver map the files instead of copying arrays
    copy = pickle.loads(payload)
    assert_same_index(copy, index)
    assert copy.trainable[10].tolist() == index.trainable[10].tolist()


WAITING = "waiting for the index cache lock"


class Running:
    """A started command whose output (stdout and stderr) is collected by a thread as it comes."""

    def __init__(self, command: list[str]) -> None:
        self.process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append("")  # end of output
            self.changed.notify_all()

    def wait_for(self, needle: str, count: int = 1, timeout: float = 120) -> None:
        """Until `needle` has been printed `count` times; the process group is killed if it is not."""
        with self.changed:
            self.changed.wait_for(lambda: sum(needle in line for line in self.lines) >= count
                                  or (self.lines and self.lines[-1] == ""), timeout)
            if sum(needle in line for line in self.lines) < count:
                self.kill()
                raise AssertionError(f"{needle!r} not seen {count}x within {timeout} s:\n{''.join(self.lines)}")

    def finish(self, timeout: float = 120) -> str:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.reader.join(timeout)
        return "".join(self.lines)

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)


def test_two_torchrun_processes_build_the_cache_once_and_both_read_it(synthetic_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    path = synthetic_root / "annotations" / "person_keypoints_train2017.json"
    lock = FileLock(str(cache / ".lock"))
    lock.acquire()  # both workers reach the lock while the test holds it: a real race for the build
    try:
        run = Running([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                       "dist_kp.data.index_cache", str(path), "--cache-dir", str(cache),
                       "--min-visible-keypoints", "10"])
        run.wait_for(WAITING, 2)
    finally:
        lock.release()
    out = run.finish()
    assert run.process.returncode == 0, out
    assert out.count(BUILDER) == 1, out
    entries = re.findall(r"\[rank(\d)\] INFO dist_kp.data.index_cache: .*training images; cache entry (\S+)", out)
    assert sorted(rank for rank, _ in entries) == ["0", "1"], out
    assert len({entry for _, entry in entries}) == 1


def test_ranks_started_independently_build_the_cache_once(synthetic_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    path = synthetic_root / "annotations" / "person_keypoints_val2017.json"
    command = [sys.executable, "-m", "dist_kp.data.index_cache", str(path), "--cache-dir", str(cache)]
    lock = FileLock(str(cache / ".lock"))
    lock.acquire()
    try:
        runs = [Running(command) for _ in range(3)]
        for run in runs:
            run.wait_for(WAITING)
    finally:
        lock.release()
    outputs = [run.finish() for run in runs]
    assert all(run.process.returncode == 0 for run in runs), outputs
    assert sum(out.count(BUILDER) for out in outputs) == 1, outputs
    assert all("cache entry" in out for out in outputs)


def upload(fs, local: Path, url: str) -> None:
    for file in sorted(local.rglob("*")):
        if file.is_file():
            fs.put_file(str(file), f"{url}/{file.relative_to(local)}")


def test_training_from_s3_gives_the_same_first_batch_as_local_disk(
        s3_server, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_server.create_bucket("dist-kp-index-data")
    upload(s3_server.filesystem(), synthetic_root, f"{bucket}/coco")
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    batches = {}
    for name, root in (("local", str(synthetic_root)), ("s3", f"s3://{bucket}/coco")):
        cfg = load_config(TINY_CONFIG, tiny_overrides(root, tmp_path / name, f"data.cache_dir={tmp_path / name}-cache",
                                                      "train.workers=1", "data.hflip_prob=0.5"))
        store = Storage.from_config(cfg.storage)
        index = train_index(cfg, store)
        assert index.source.startswith("s3://" if name == "s3" else "/")
        loader, sampler = build_train_loader(cfg, index, rank=1, world_size=2, device=torch.device("cpu"), storage=store)
        sampler.set_epoch(1)
        batches[name] = next(iter(loader))
    (local_images, local_targets, _), (s3_images, s3_targets, _) = batches["local"], batches["s3"]
    assert len(local_images) == len(s3_images) > 0
    for a, b in zip(local_images, s3_images):
        assert a.dtype == torch.uint8 and torch.equal(a, b)
    for a, b in zip(local_targets, s3_targets):
        assert_same_target(a, b)
    # The training CLI from the same S3 root: one step, the same loss as from local disk.
    losses = {}
    for name, root in (("local", str(synthetic_root)), ("s3", f"s3://{bucket}/coco")):
        out = tmp_path / f"run-{name}"
        check(run_module("dist_kp.train", ["--config", str(TINY_CONFIG), *tiny_overrides(
            root, out, "train.max_steps=1", "train.workers=1", "eval.at_end=false", "eval.every_epochs=0",
            f"data.cache_dir={tmp_path / 'run-cache'}")], env=child_env(**s3_server.env()), timeout=300))
        record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        losses[name] = {k: v for k, v in record.items() if k.startswith("train/")}
    assert losses["local"] == losses["s3"] and losses["local"]
