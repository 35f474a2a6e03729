"""Config changes at resume are applied from the resumed step on, or refused naming the keys: never ignored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dist_kp.config import load_config
from dist_kp.engine.schedule import lr_factor
from tests.conftest import TINY_CONFIG, check, run_module, tiny_overrides, train_here
from tests.test_agreement import TRAIN_JSON, changed_copy
from tests.test_hostile_runs import store_of

STEPS_PER_EPOCH = 6  # 48 training images, 2 processes x 4 images


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), *tiny_overrides(data, out, "train.workers=0", "eval.every_epochs=0",
                                                          "eval.at_end=false", *extra)]


@pytest.fixture(scope="module")
def three_steps(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("three") / "run"
    check(run_module("dist_kp.train", train_args(synthetic_root, out, "train.max_steps=3"), nproc=2))
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_a_new_lr_and_momentum_at_resume_apply_from_the_resumed_step(three_steps: Path, synthetic_root: Path,
                                                                     tmp_path: Path) -> None:
    out = copy_of(three_steps, tmp_path)
    result = check(run_module("dist_kp.train", train_args(synthetic_root, out, "train.max_steps=5", "optim.lr=0.01",
                                                          "optim.momentum=0.8"), nproc=2))
    schedule = load_config(TINY_CONFIG, []).schedule
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert sorted(lrs) == [1, 2, 3, 4, 5]
    for step, lr in lrs.items():
        base = 0.02 if step <= 3 else 0.01
        assert lr == pytest.approx(base * lr_factor(step, schedule, STEPS_PER_EPOCH, 10 * STEPS_PER_EPOCH)), step
    _, state = store_of(out).latest()
    group = state["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["initial_lr"]) == (0.8, 0.01)
    changed = [line for line in result.stderr.splitlines() if "config changed since" in line and "optim.lr" in line]
    assert len(changed) == 1 and "[rank0]" in changed[0], changed  # logged once, by rank 0
    assert "optim.lr 0.02 -> 0.01, applied from step 3 on" in changed[0]


def test_a_changed_training_set_at_resume_is_refused_naming_the_key_and_keeps_config_yaml(
        three_steps: Path, synthetic_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    out = copy_of(three_steps, tmp_path)
    config_before = (out / "config.yaml").read_bytes()
    result = train_here(train_args(synthetic_root, out, "train.max_steps=5", "data.min_visible_keypoints=3"), capfd)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "data.min_visible_keypoints (5 in the checkpoint, 3 now)" in result.stderr
    assert "Traceback" not in result.stderr
    assert store_of(out).steps()[-1] == 3  # nothing trained
    assert (out / "config.yaml").read_bytes() == config_before  # the run's config, not the refused one


def test_a_run_that_set_min_visible_keypoints_10_on_17_keypoints_resumes_with_the_default_that_means_10(
        synthetic_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"  # written as the COCO config (and every run before the default followed the skeleton)
    check(train_here(train_args(synthetic_root, out, "train.max_steps=2", "data.min_visible_keypoints=10"), capfd))
    result = check(train_here(train_args(synthetic_root, out, "train.max_steps=3", "data.min_visible_keypoints=null"),
                              capfd))
    assert "resumed from" in result.stderr and "training finished at step 3" in result.stderr
    assert "data.min_visible_keypoints" not in result.stderr  # neither refused nor logged as a change
    assert store_of(out).latest()[1]["config"]["data"]["min_visible_keypoints"] == 10  # recorded resolved


def test_a_run_resumed_with_max_steps_below_its_checkpoint_changes_nothing_and_says_so(
        three_steps: Path, synthetic_root: Path, tmp_path: Path) -> None:
    out = copy_of(three_steps, tmp_path)
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    result = check(run_module("dist_kp.train", train_args(synthetic_root, out, "train.max_steps=2"), nproc=2))
    assert "is already past the end of this run (step 3, epoch 0, batch 3; now train.epochs=10, " \
           "train.max_steps=2): nothing to train, nothing written" in result.stderr
    assert "training finished" not in result.stderr
    after = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    # model_final.pt, checkpoints, metrics, config.yaml untouched; the lease taken and released
    assert changed <= {Path("lease.json")}, changed


def test_a_dataset_moved_to_another_root_resumes_when_its_content_is_the_same(three_steps: Path,
                                                                              synthetic_root: Path, tmp_path: Path,
                                                                              capfd: pytest.CaptureFixture) -> None:
    out = copy_of(three_steps, tmp_path)
    moved = shutil.copytree(synthetic_root, tmp_path / "moved")
    result = check(train_here(train_args(moved, out, "train.max_steps=5"), capfd))
    assert f"data.root {str(synthetic_root)!r} -> {str(moved)!r}, applied from step 3 on" in result.stderr
    store = store_of(out)
    assert store.steps()[-1] == 5
    assert store.latest()[1]["config"]["data"]["root"] == str(moved)


def test_a_moved_dataset_with_other_content_at_resume_is_refused_saying_the_content_differs(
        three_steps: Path, synthetic_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    out = copy_of(three_steps, tmp_path)
    changed = changed_copy(synthetic_root, tmp_path / "changed")
    result = train_here(train_args(changed, out, "train.max_steps=5"), capfd)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"data.root ({str(synthetic_root)!r} in the checkpoint, {str(changed)!r} now): the content differs " \
           f"(data.train_annotations content sha256" in result.stderr
    assert f"({changed}/{TRAIN_JSON}) now" in result.stderr
    assert "Traceback" not in result.stderr
    assert store_of(out).steps()[-1] == 3  # nothing trained
