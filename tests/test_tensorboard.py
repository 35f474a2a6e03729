"""tracking.tensorboard: event files under OUTPUT_DIR/tensorboard/ (local or uploaded to S3), read back by TensorBoard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_kp.engine.hooks import Hook
from dist_kp.storage.run_folder import names_a_run_file
from tests.conftest import TINY_CONFIG, check, child_env, run_module, tiny_overrides
from tests.test_tracking import metrics_records, offline_runs, wandb_env

TRAIN_KEYS = ("train/loss", "train/loss_keypoint", "lr", "images_per_s")
EVAL_KEYS = ("kp/AP", "bbox/AP")


def train_args(root: Path, out: str | Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), *tiny_overrides(
        root, out, "tracking.tensorboard=true", "train.workers=0", "eval.every_epochs=0", "eval.max_images=2",
        "eval.num_visualize=0", *extra)]


def scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the event files in `logdir`, as TensorBoard itself reads them: tag -> step -> value."""
    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_and_wandb_together_get_the_same_scalars(tmp_path: Path, synthetic_root: Path) -> None:
    out = tmp_path / "run"
    check(run_module("dist_kp.train", train_args(synthetic_root, out, "train.max_steps=3", "tracking.mode=offline"),
                     env=wandb_env(tmp_path / "wandb")))
    read = scalars(out / "tensorboard")
    records = metrics_records(out)
    for key in TRAIN_KEYS:
        assert read[key] == pytest.approx({step: r[key] for step, r in records.items()}, rel=1e-6), key
    evaluation = json.loads((out / "eval" / "00000003" / "metrics.json").read_text())
    for key in EVAL_KEYS:
        assert read[key] == pytest.approx({3: evaluation[key]}, rel=1e-6, abs=1e-7), key
    (run,) = offline_runs(tmp_path / "wandb")  # W&B ran alongside and got the same numbers
    for key in (*TRAIN_KEYS, *EVAL_KEYS):
        assert {step: row[key] for step, row in run.rows_with(key).items()} == pytest.approx(read[key], rel=1e-6)
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert any(f.startswith("tensorboard/events.out.tfevents.") for f in files)
    assert all(names_a_run_file(f) for f in files), files


class BreakTensorBoard(Hook):
    """After step 2, the TensorBoard folder becomes a plain file: every later write to it fails."""

    def __init__(self, cfg) -> None:
        self.folder = Path(cfg.output_dir) / "tensorboard"

    def after_step(self, trainer) -> None:
        if trainer.progress.step == 2:
            shutil.rmtree(self.folder)
            self.folder.write_text("not a folder")


def test_a_failing_tensorboard_writer_warns_once_and_training_goes_on(tmp_path: Path, synthetic_root: Path) -> None:
    out = tmp_path / "run"
    result = check(run_module("dist_kp.train", train_args(synthetic_root, out, "train.max_steps=5",
                                                          f"train.hooks=[{__name__}:BreakTensorBoard]")))
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line and "TensorBoard" in line]
    assert len(warnings) == 1 and "training goes on without TensorBoard" in warnings[0], result.stderr[-3000:]
    assert "training finished at step 5" in result.stderr
    assert sorted(metrics_records(out)) == [1, 2, 3, 4, 5]
    assert (out / "eval" / "00000005" / "metrics.json").is_file()


def test_object_store_run_uploads_its_event_files_at_checkpoints_and_at_the_end(tmp_path: Path, synthetic_root: Path,
                                                                               s3_server) -> None:
    bucket = s3_server.create_bucket("tensorboard")
    temp = tmp_path / "tmp"
    temp.mkdir()
    check(run_module("dist_kp.train", train_args(synthetic_root, f"s3://{bucket}/run", "train.max_steps=3",
                                                 "checkpoint.every_steps=2"),
                     env=child_env(TMPDIR=str(temp), **s3_server.env())))
    local = tmp_path / "copy"
    s3_server.filesystem().get(f"{bucket}/run/tensorboard", str(local), recursive=True)
    read = scalars(local)
    assert sorted(read["train/loss"]) == [1, 2, 3] and sorted(read["kp/AP"]) == [3]
    assert not list(temp.glob("dist_kp-tensorboard-*"))  # the local copy is gone once uploaded
