"""W&B tracking (real wandb, offline, no network) across kills and restarts, and the PNG report.

W&B runs are read back from wandb's own transaction log (OFFLINE_DIR/run-<id>.wandb): the
LevelDB-log framing wandb writes, holding `wandb.proto.wandb_internal_pb2.Record` messages.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import wandb
from PIL import Image

from dist_kp.config import ConfigError, load_config
from dist_kp.report import load_history, plot_ap, plot_losses
from dist_kp.storage.run_folder import RunFolder
from dist_kp.config.secrets import redact
from tests.conftest import (
    TINY_CONFIG,
    check,
    child_env,
    kill_when_held,
    run_module,
    start_module,
    tiny_overrides,
)

FAKE_API_KEY = "f" * 32 + "5eCr3tWandbKey0"
URL_PASSWORD = "Pa55w0rdInsideAUrl"
# Any attempt of wandb to reach a server ends at a closed loopback port, never the network.
NO_SERVER = "http://127.0.0.1:9"
LOSS_KEYS = ("train/loss", "train/loss_classifier", "train/loss_box_reg", "train/loss_keypoint",
             "train/loss_objectness", "train/loss_rpn_box_reg", "lr", "images_per_s", "data_time_s",
             "max_memory_mb")
EVAL_KEYS = ("kp/AP", "kp/AP50", "kp/AP75", "kp/APm", "kp/APl", "kp/AR", "bbox/AP", "bbox/AP50")
NUM_PICTURES = 2


def wandb_env(wandb_dir: Path, **extra: str) -> dict[str, str]:
    env = child_env(**extra)
    env.update(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), WANDB_CONFIG_DIR=str(wandb_dir / "config"),
               WANDB_CACHE_DIR=str(wandb_dir / "cache"), WANDB_DATA_DIR=str(wandb_dir / "data"),
               WANDB_API_KEY=FAKE_API_KEY, WANDB_BASE_URL=NO_SERVER, WANDB_SILENT="true")
    return env


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), *tiny_overrides(
        root, out, "tracking.mode=offline", "tracking.project=dist-kp-tests", "tracking.tags=[ci]",
        "train.workers=0", "checkpoint.every_steps=4", "eval.every_epochs=1", "eval.max_images=8",
        f"eval.num_visualize={NUM_PICTURES}",
        # Not used by a local output_dir, but it is in the config W&B receives: its password must not be.
        f"storage.options.endpoint_url=http://ci:{URL_PASSWORD}@127.0.0.1:9", *extra)]


# --- wandb's transaction log -------------------------------------------------------------------------

BLOCK = 32768
HEADER = 7  # ":W&B", magic 0xBEE1, version byte


def read_records(path: Path) -> list:
    """Every complete Record of a .wandb file (a run killed mid-write leaves a cut last record)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    records, chunks, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        if kind == 0 or len(payload) < length:
            break
        pos += 7 + length
        chunks = payload if kind in (1, 2) else chunks + payload
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
    return records


@dataclass
class OfflineRun:
    """One offline run directory: its id, history rows by step and config."""

    folder: Path
    run_id: str = ""
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return [row["_step"] for row in self.history]

    def rows_with(self, key: str) -> dict[int, dict]:
        return {row["_step"]: row for row in self.history if key in row}


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """The offline runs under WANDB_DIR, oldest first (folder names start with the start time)."""
    runs = []
    for folder in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        (log_file,) = folder.glob("run-*.wandb")
        run = OfflineRun(folder)
        for record in read_records(log_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.run_id = record.run.run_id
                run.config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                run.config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                run.history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                    for i in record.history.item})
        runs.append(run)
    return runs


def metrics_records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def eval_steps(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "eval").iterdir())


def newest_checkpoint_run_id(out: Path) -> str:
    newest = sorted((out / "checkpoints").iterdir())[-1]
    return torch.load(newest / "state.pt", weights_only=True)["tracking"]["run_id"]


# --- runs shared by the tests ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A 2-process run of 10 steps (6 per epoch): evaluations at steps 6 and 10."""
    base = tmp_path_factory.mktemp("straight")
    out, wandb_dir = base / "run", base / "wandb"
    result = check(run_module("dist_kp.train", train_args(synthetic_root, out, "train.max_steps=10"), nproc=2,
                              env=wandb_env(wandb_dir)))
    return out, wandb_dir, result.stderr


@pytest.fixture(scope="module")
def resumed_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """Killed (SIGKILL, every process) after step 11 with the newest checkpoint at 8, then run again to 14.

    The first start holds after step 11 (tests.hook_probe:HoldHook) until W&B's offline log holds a
    step past the checkpoint: the steps the resumed start must not send again. Its log is written
    every 0.5 s here (15 s by default), which only shortens that wait.
    """
    base = tmp_path_factory.mktemp("resumed")
    out, wandb_dir, probe = base / "run", base / "wandb", base / "probe"
    probe.mkdir()
    args = train_args(synthetic_root, out, "train.max_steps=14", "train.hooks=[tests.hook_probe:HoldHook]")
    env = wandb_env(wandb_dir, WANDB__TRANSACTION_LOG_FLUSH_INTERVAL="0.5", PROBE_DIR=str(probe))
    first = start_module("dist_kp.train", args, nproc=2, env={**env, "HOLD_AT_STEP": "11"})
    kill_when_held(first, probe, 2, r"checkpoint step 8 saved", ready=lambda: wandb_steps_past(wandb_dir, 8))
    result = check(run_module("dist_kp.train", args, nproc=2, env=env))
    assert "at step 8" in result.stderr, result.stderr[-3000:]
    return out, wandb_dir, result.stderr


def wandb_steps_past(wandb_dir: Path, step: int) -> bool:
    """True once the (only) offline run's transaction log holds a history row past `step`."""
    logs = list((wandb_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    return len(logs) == 1 and any(row_step > step for row_step in offline_runs(wandb_dir)[0].steps)


# --- tests -------------------------------------------------------------------------------------------

def test_offline_run_holds_losses_at_logged_steps_ap_at_eval_steps_and_prediction_images(straight_run) -> None:
    out, wandb_dir, _ = straight_run
    (run,) = offline_runs(wandb_dir)
    assert run.run_id == json.loads((out / "tracking.json").read_text())["run_id"] == newest_checkpoint_run_id(out)
    logged = metrics_records(out)
    assert run.steps == sorted(logged) == list(range(1, 11))
    for row in run.history:
        for key in LOSS_KEYS:
            assert row[key] == pytest.approx(logged[row["_step"]][key]), (row["_step"], key)
    evaluations = run.rows_with("kp/AP")
    assert sorted(evaluations) == eval_steps(out) == [6, 10]
    for step, row in evaluations.items():
        written = json.loads((out / "eval" / f"{step:08d}" / "metrics.json").read_text())
        for key in EVAL_KEYS:
            assert row[key] == pytest.approx(written[key]), (step, key)
        assert row["predictions/_type"] == "images/separated"
        assert row["predictions/count"] == NUM_PICTURES
        for name in row["predictions/filenames"]:
            assert (run.folder / "files" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / "eval" / f"{step:08d}" / "predictions.png").stat().st_size > 1000
    # The same validation images at every evaluation, so that the pictures show the model's progress.
    captions = [row["predictions/captions"] for row in evaluations.values()]
    assert len(captions[0]) == NUM_PICTURES and all(c == captions[0] for c in captions)
    # Every checkpoint (every 4 steps, epoch ends, the end) in its own step's row, however long its upload took.
    urls = {step: row["checkpoint/url"] for step, row in run.rows_with("checkpoint/url").items()}
    assert urls == {step: f"{out}/checkpoints/step_{step:08d}" for step in (4, 6, 8, 10)}


def test_kill_and_resume_keeps_one_run_whose_steps_strictly_increase(resumed_run) -> None:
    out, wandb_dir, stderr = resumed_run
    before, after = offline_runs(wandb_dir)
    assert before.run_id == after.run_id == json.loads((out / "tracking.json").read_text())["run_id"]
    assert newest_checkpoint_run_id(out) == before.run_id
    # The killed process had sent steps past its newest checkpoint (8); they are not sent again.
    assert max(before.steps) > 8
    steps = before.steps + after.steps
    assert steps == sorted(set(steps)), steps
    assert after.steps[-1] == 14 and sorted(after.rows_with("kp/AP")) == [12, 14]
    assert "not sending them again" in stderr
    assert sorted(metrics_records(out)) == list(range(1, 15))


def test_run_config_reaches_wandb_without_any_secret(straight_run, resumed_run) -> None:
    for out, wandb_dir, _ in (straight_run, resumed_run):
        for run in offline_runs(wandb_dir):
            assert run.config["train"]["max_steps"] in (10, 14)
            assert run.config["storage"]["options"]["endpoint_url"] == "http://<redacted>@127.0.0.1:9"
        for path in [*wandb_dir.rglob("*"), *out.rglob("*")]:
            if path.is_file() and path.suffix not in (".pt",):
                data = path.read_bytes()
                assert FAKE_API_KEY.encode() not in data, path
                if path.name != "config.yaml":  # the run's own resolved config is the user's file
                    assert URL_PASSWORD.encode() not in data, path


def test_unreachable_wandb_server_does_not_stop_training_and_warns_once(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--config", str(TINY_CONFIG), *tiny_overrides(
        synthetic_root, out, "tracking.mode=online", "train.max_steps=3", "train.workers=0", "eval.every_epochs=0",
        "eval.at_end=false")]
    env = wandb_env(tmp_path / "wandb", WANDB_INIT_TIMEOUT="5", WANDB__GRAPHQL_RETRY_MAX="1")
    env["WANDB_MODE"] = "online"
    result = check(run_module("dist_kp.train", args, env=env, timeout=300))
    warnings = re.findall(r"WARNING dist_kp.tracking.wandb_run: W&B .* failed", result.stderr)
    assert len(warnings) == 1, result.stderr[-4000:]
    assert sorted(metrics_records(out)) == [1, 2, 3]
    assert "training finished at step 3" in result.stderr


def test_wandb_mode_in_the_environment_overrides_the_config(tmp_path: Path, monkeypatch) -> None:
    from dist_kp.tracking.metrics_file import MetricsFile
    from dist_kp.tracking.wandb_run import Tracker

    for key, value in wandb_env(tmp_path / "wandb").items():
        if key.startswith("WANDB_"):
            monkeypatch.setenv(key, value)
    (tmp_path / "run").mkdir()
    cfg = load_config(TINY_CONFIG, [f"output_dir={tmp_path / 'run'}", "tracking.mode=online"])
    tracker = Tracker(cfg, MetricsFile(RunFolder(str(tmp_path / "run"))), run_id="envmode1")
    assert tracker.run is not None and tracker.run.settings.mode == "offline"
    tracker.record({"step": 1, "train/loss": 2.5})
    tracker.finish()
    # run.finish() can return before W&B's service has written the transaction log (seen under load:
    # a log without a single record); teardown ends the service, which writes everything first.
    wandb.teardown()
    (run,) = offline_runs(tmp_path / "wandb")
    assert run.run_id == "envmode1" and run.rows_with("train/loss")[1]["train/loss"] == 2.5


def test_api_key_in_the_config_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError, match=r"tracking.api_key: credentials do not belong") as error:
        load_config(TINY_CONFIG, [f"tracking.api_key={FAKE_API_KEY}"])
    assert FAKE_API_KEY not in str(error.value)


def test_redact_removes_url_passwords_query_strings_and_secret_keys() -> None:
    cfg = {"weights": "https://u:pw@host/w.pt?X-Amz-Signature=abc", "opts": {"aws_secret": "s", "region": "r"},
           "sizes": [1, 2], "root": "s3://bucket/coco"}
    assert redact(cfg) == {"weights": "https://<redacted>@host/w.pt?<redacted>",
                           "opts": {"aws_secret": "<redacted>", "region": "r"}, "sizes": [1, 2],
                           "root": "s3://bucket/coco"}


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def assert_drawn(path: Path, min_size: tuple[int, int] = (300, 200)) -> None:
    pixels = png_pixels(path)
    assert pixels.shape[1] >= min_size[0] and pixels.shape[0] >= min_size[1], (path, pixels.shape)
    # Not blank: many colours (curves, text, antialiasing), and far from one flat colour.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 30, path
    assert pixels.std() > 10, path


def test_report_writes_labelled_plots_of_the_run_metrics_and_the_pictures(straight_run, tmp_path: Path) -> None:
    out, _, _ = straight_run
    report = tmp_path / "report"
    result = check(run_module("dist_kp.report", [str(out), "--out", str(report)]))
    first, last = metrics_records(out)[1], metrics_records(out)[10]
    assert (f"training loss: {first['train/loss']:.3f} at step 1, {last['train/loss_smoothed']:.3f} (smoothed) "
            "at step 10") in result.stderr
    for name in ("losses.png", "lr.png", "throughput.png", "ap.png"):
        assert_drawn(report / name)
    assert (report / "predictions.png").read_bytes() == (out / "eval" / "00000010" / "predictions.png").read_bytes()
    assert_drawn(report / "predictions.png", min_size=(200, 300))

    history, logged = load_history(str(out)), metrics_records(out)
    losses = plot_losses(history)
    (total,) = [ax for ax in losses.axes if ax.get_title() == "loss"]
    assert (total.get_xlabel(), total.get_ylabel()) == ("global step", "loss")
    assert list(total.lines[0].get_xdata()) == sorted(logged)
    assert list(total.lines[0].get_ydata()) == [logged[s]["train/loss"] for s in sorted(logged)]
    keypoints = plot_ap(history).axes[0]
    (ap_line,) = [line for line in keypoints.lines if line.get_label() == "AP"]
    written = {s: json.loads((out / "eval" / f"{s:08d}" / "metrics.json").read_text()) for s in (6, 10)}
    assert list(ap_line.get_xdata()) == [6, 10]
    assert list(ap_line.get_ydata()) == [written[6]["kp/AP"], written[10]["kp/AP"]]


def test_report_reads_a_run_on_s3(straight_run, s3_server, tmp_path: Path) -> None:
    out, _, _ = straight_run
    bucket = s3_server.create_bucket("report-test")
    s3_server.filesystem().put(str(out), f"{bucket}/run", recursive=True)
    report = tmp_path / "report"
    check(run_module("dist_kp.report", [f"s3://{bucket}/run", "--out", str(report)],
                     env=child_env(**s3_server.env())))
    for name in ("losses.png", "lr.png", "throughput.png", "ap.png", "predictions.png"):
        assert (report / name).stat().st_size > 1000


def test_a_wandb_failure_mid_run_turns_tracking_off_once_and_records_go_on(tmp_path: Path, monkeypatch,
                                                                            caplog) -> None:
    from dist_kp.tracking.metrics_file import MetricsFile
    from dist_kp.tracking.wandb_run import Tracker

    for key, value in wandb_env(tmp_path / "wandb").items():
        if key.startswith("WANDB_"):
            monkeypatch.setenv(key, value)
    (tmp_path / "run").mkdir()
    cfg = load_config(TINY_CONFIG, [f"output_dir={tmp_path / 'run'}", "tracking.mode=offline"])
    metrics = MetricsFile(RunFolder(str(tmp_path / "run")))
    tracker = Tracker(cfg, metrics, run_id="midrun1")
    tracker.record({"step": 1, "train/loss": 2.5})
    tracker.run.finish()  # the W&B run goes away under the tracker: its next log call raises
    with caplog.at_level("WARNING", logger="dist_kp.tracking.wandb_run"):
        for step in (2, 3, 4):
            tracker.record({"step": step, "train/loss": 2.0})
        # What the checkpoint hook tells the hooks at step 4 (the trainer: only what the tracker reads).
        tracker.after_checkpoint(SimpleNamespace(progress=SimpleNamespace(step=4)), "file:///run/checkpoints/step_00000004")
    assert tracker.run is None
    assert len([r for r in caplog.records if "training goes on without W&B" in r.getMessage()]) == 1
    assert [r["step"] for r in metrics.records] == [1, 2, 3, 4]
    tracker.finish()
