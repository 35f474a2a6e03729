"""Checkpoints: exact resume after SIGKILL (local and S3), fallback past corrupt ones, no secrets."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from dist_kp.engine.checkpoint import CheckpointError, CheckpointStore, ResumeChoice, choose_checkpoint
from dist_kp.config import CheckpointConfig
from dist_kp.storage.run_folder import RunFolder
from dist_kp.storage import Storage
from tests.conftest import (
    TINY_CONFIG,
    LogReader,
    check,
    child_env,
    environment,
    kill_tree,
    run_module,
    start_module,
    tiny_overrides,
    train_here,
    wait_until,
)
from tests.s3_server import ACCESS_KEY, SECRET_KEY

STEPS = 10
BASE = (f"train.max_steps={STEPS}", "checkpoint.every_steps=4", "eval.every_epochs=0", "eval.at_end=false")
# A short warmup: the average moves away from the weights within the run.
EMA = ("train.ema.decay=0.9", "train.ema.warmup_steps=2")
EMA_STATE = "hook:dist_kp.engine.hooks.EMAHook"


def train_args(root: Path, out: str, workers: int, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), *tiny_overrides(root, out, *BASE, f"train.workers={workers}", *extra)]


def final_state(out: str, env: dict | None = None) -> dict:
    with environment(**(env or {})):
        url, state = CheckpointStore(RunFolder(out), CheckpointConfig()).latest()
    assert url.endswith(f"step_{STEPS:08d}")
    return state


def records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def assert_same_training(a: dict, b: dict) -> None:
    assert a["progress"] == b["progress"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


def loss_terms(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.startswith("train/") and not k.endswith("_smoothed")}


@pytest.fixture(scope="module")
def straight_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference every killed run ends identical to, with the EMA of the weights on: the average only
    reads the weights, so the runs without it train (weights, optimizer, losses) exactly like this one."""
    out = tmp_path_factory.mktemp("straight")
    check(run_module("dist_kp.train", train_args(synthetic_root, str(out), 1, *EMA), nproc=2))
    return out


def kill_between_checkpoints(process, kill_step: int, timeout: float = 300) -> tuple[str, int]:
    """SIGKILL every process of the run once it logged step `kill_step` past a stored checkpoint.

    Saves finish in the background, so the kill waits for the first "saved" line if it has not
    come yet. Returns the log and the newest step logged as saved.
    """
    lines, saved, reached = [], [], 0
    deadline = time.monotonic() + timeout
    for line in process.stderr:
        lines.append(line)
        if found := re.search(r"checkpoint step (\d+) saved", line):
            saved.append(int(found.group(1)))
        if found := re.search(r"\] step (\d+) ", line):
            reached = int(found.group(1))
        if (reached >= kill_step and saved) or time.monotonic() > deadline:
            break
    kill_tree(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    log = "".join(lines)
    assert reached >= kill_step and saved, f"step {kill_step} past a checkpoint not logged:\n{log[-4000:]}"
    assert reached > saved[-1], "the kill must lose steps past the newest checkpoint"
    return log, saved[-1]


def resumed_at(log: str) -> int:
    found = re.search(r"resumed from \S+ at step (\d+)", log)
    assert found, log[-4000:]
    return int(found.group(1))


@pytest.mark.parametrize("kill_step, workers_after, ema", [(9, 1, ()), (5, 2, EMA)], ids=["9-1", "5-2-ema"])
def test_sigkill_then_same_command_ends_bit_identical(straight_run: Path, synthetic_root: Path, tmp_path: Path,
                                                      kill_step: int, workers_after: int, ema: tuple[str, ...]) -> None:
    """Killed past a checkpoint, the same command again (here with another number of loader workers) ends
    identical to the straight run; with the EMA of the weights on, the average is restored too."""
    out = tmp_path / "killed"
    first = start_module("dist_kp.train", train_args(synthetic_root, str(out), 1, *ema), nproc=2)
    _, last_saved = kill_between_checkpoints(first, kill_step)
    assert not (out / "model_final.pt").exists()
    result = check(run_module("dist_kp.train", train_args(synthetic_root, str(out), workers_after, *ema), nproc=2))
    # A save whose "saved" line the kill cut off is complete too: resume is from it or newer.
    resumed_step = resumed_at(result.stderr)
    assert resumed_step >= last_saved
    a, b = final_state(str(straight_run)), final_state(str(out))
    assert_same_training(a, b)
    records_a, records_b = records(straight_run), records(out)
    assert sorted(records_b) == list(range(1, STEPS + 1))
    for step in range(resumed_step + 1, STEPS + 1):
        assert loss_terms(records_a[step]) == loss_terms(records_b[step]), step
    if ema:
        assert_ema_restored_and_final(result.stderr, a, b, straight_run, out)


def assert_ema_restored_and_final(log: str, a: dict, b: dict, straight_run: Path, out: Path) -> None:
    assert "holds no state of dist_kp.engine.hooks.EMAHook" not in log  # restored, not restarted
    assert a[EMA_STATE]["updates"] == b[EMA_STATE]["updates"] == STEPS
    for name, averaged in a[EMA_STATE]["parameters"].items():
        assert torch.equal(averaged, b[EMA_STATE]["parameters"][name]), name
    finals = [torch.load(run / "model_final.pt", weights_only=True) for run in (straight_run, out)]
    assert finals[0]["ema"] is finals[1]["ema"] is True and finals[0]["ema_updates"] == STEPS
    for name, tensor in finals[0]["model"].items():
        assert torch.equal(tensor, finals[1]["model"][name]), name
    # model_final.pt holds the average, not the trained weights of the last step.
    assert not all(torch.equal(finals[1]["model"][name], b["model"][name]) for name in b[EMA_STATE]["parameters"])
    assert "model_final.pt: EMA weights (decay 0.9, warmup 2 steps, 10 updates)" in log


def make_store(out: Path, **options) -> CheckpointStore:
    return CheckpointStore(RunFolder(str(out)), CheckpointConfig(**options))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(straight_run: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(straight_run, out)
    steps = make_store(out).steps()
    newest = out / "checkpoints" / f"step_{steps[-1]:08d}" / "state.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    newest.write_bytes(bytes(data))
    url, state = make_store(out).latest()
    assert url.endswith(f"step_{steps[-2]:08d}") and state["progress"]["step"] == steps[-2]
    assert f"skipping {out}/checkpoints/step_{steps[-1]:08d}" in caplog.text
    previous = out / "checkpoints" / f"step_{steps[-2]:08d}" / "state.pt"
    previous.write_bytes(previous.read_bytes()[:1000])  # truncated
    url, _ = make_store(out).latest()
    assert url.endswith(f"step_{steps[-3]:08d}")


def test_resume_from_an_explicit_url_takes_that_checkpoint(straight_run: Path) -> None:
    store = make_store(straight_run)
    oldest = store.steps()[0]
    (url, state), _ = store.resolve(f"file://{straight_run}/checkpoints/step_{oldest:08d}")
    assert state["progress"]["step"] == oldest and oldest < STEPS


def test_a_folder_without_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    folder = tmp_path / "checkpoints" / "step_00000007"
    folder.mkdir(parents=True)
    torch.save({"progress": {"step": 7}}, folder / "state.pt")
    assert store.steps() == [7] and store.manifest(7) is None and store.latest() is None


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    marker = tmp_path / "pwned"
    RunsCode.marker = marker
    store.write(3, {"progress": {"epoch": 0, "batch": 3, "step": 3}, "epoch_end": False, "payload": torch.zeros(2)})
    folder = tmp_path / "checkpoints" / "step_00000003"
    malicious = pickle.dumps({"progress": {"step": 3}, "x": RunsCode()})
    buffer = io.BytesIO()
    torch.save({"safe": torch.zeros(1)}, buffer)
    # A real torch zip file whose data.pkl runs code: same framing, crafted pickle, a valid manifest.
    import zipfile

    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, zipfile.ZipFile(folder / "state.pt", "w") as dst:
        for item in src.infolist():
            dst.writestr(item, malicious if item.filename.endswith("data.pkl") else src.read(item.filename))
    data = (folder / "state.pt").read_bytes()
    import hashlib

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="refused to load") as refused:
        store.read(store.step_url(3))
    # What the file tried to load, and never PyTorch's advice to load it anyway (weights_only=False).
    assert "may run code" in str(refused.value) and "weights_only" not in str(refused.value)
    assert store.latest() is None
    assert not marker.exists()


def test_resume_none_refuses_an_output_dir_with_checkpoints(straight_run: Path, synthetic_root: Path,
                                                           capfd: pytest.CaptureFixture) -> None:
    result = train_here([*train_args(synthetic_root, str(straight_run), 0), "checkpoint.resume=none"], capfd)
    assert result.returncode != 0
    assert "already holds checkpoints" in result.stderr and "checkpoint.overwrite=true" in result.stderr


def test_resume_none_with_overwrite_deletes_the_earlier_runs_checkpoints_after_the_decision(tmp_path: Path) -> None:
    earlier = make_store(tmp_path)
    for step in (10, 20):
        earlier.write(step, tiny_state(step))
    store = make_store(tmp_path, resume="none", overwrite=True)
    found, choice = store.resolve("none")
    assert found is None and choice.start_over == (10, 20)
    assert store.steps() == [10, 20]  # deciding deletes nothing
    store.remove_earlier(choice)
    assert store.steps() == []
    store.write(2, tiny_state(2))
    assert store.latest()[0] == store.step_url(2)  # the next `resume: auto` continues the new run


def test_keep_last_prunes_old_checkpoints_but_not_the_resumed_one(tmp_path: Path) -> None:
    store = make_store(tmp_path, keep_last=2)
    store.protect(1)
    for step in (1, 2, 3, 4):
        store.write(step, tiny_state(step))
    assert store.steps() == [1, 3, 4]


def tiny_state(step: int, epoch: int = 0, epoch_end: bool = False) -> dict:
    return {"progress": {"epoch": epoch, "batch": step, "step": step}, "epoch_end": epoch_end,
            "weights": torch.full((4,), float(step))}


def test_keep_every_epochs_also_keeps_those_epoch_end_checkpoints(tmp_path: Path) -> None:
    store = make_store(tmp_path, keep_last=1, keep_every_epochs=2)
    for step, epoch in ((3, 1), (6, 2), (9, 3), (12, 4)):
        store.write(step, tiny_state(step, epoch, epoch_end=True))
    store.write(13, tiny_state(13, 4))
    assert store.steps() == [6, 12, 13]


def test_an_epoch_end_on_a_periodic_step_is_saved_as_the_epoch_end_and_kept(synthetic_root: Path,
                                                                           tmp_path: Path) -> None:
    # 6 steps per epoch at 2 processes: step 6 is both every_steps=3's and the end of epoch 0.
    out = tmp_path / "run"
    args = ["--config", str(TINY_CONFIG), *tiny_overrides(
        synthetic_root, out, "train.max_steps=8", "checkpoint.every_steps=3", "checkpoint.keep_last=1",
        "checkpoint.keep_every_epochs=1", "train.workers=0", "eval.every_epochs=0", "eval.at_end=false")]
    result = check(run_module("dist_kp.train", args, nproc=2))
    assert "6 steps per epoch per rank" in result.stderr
    store = make_store(out)
    assert store.steps() == [6, 8]
    assert (store.manifest(6)["epoch"], store.manifest(6)["epoch_end"]) == (1, True)


def test_pruning_removes_partial_folders_older_than_the_newest_checkpoint(tmp_path: Path) -> None:
    store = make_store(tmp_path, keep_last=2)
    store.write(2, tiny_state(2))
    (tmp_path / "checkpoints" / "step_00000003").mkdir()
    (tmp_path / "checkpoints" / "step_00000003" / "state.pt").write_bytes(b"cut off by a kill")
    store.write(4, tiny_state(4))
    assert store.steps() == [2, 4]


def put(fs, path: str, data: bytes = b"kept by the user") -> None:
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, data)


def left_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "that dist_kp did not write" in r.getMessage()]


def prune_among_files_of_others(out: str, fs, root: str, caplog: pytest.LogCaptureFixture) -> None:
    """Pruning in `out` (`root` on `fs`) deletes a save's files and keeps anyone else's, named in one warning."""
    store = CheckpointStore(RunFolder(out), CheckpointConfig(keep_last=1))
    store.write(2, tiny_state(2))
    checkpoints = f"{root}/checkpoints"
    put(fs, f"{checkpoints}/step_00000002/notes.txt")
    put(fs, f"{checkpoints}/step_00000001/state.pt", b"cut off by a kill")  # dist_kp's names only: all goes
    put(fs, f"{checkpoints}/step_00000003/state.pt", b"cut off by a kill")
    put(fs, f"{checkpoints}/step_00000003/plots/loss.png")
    with caplog.at_level(logging.WARNING, logger="dist_kp.engine.checkpoint"):
        store.write(4, tiny_state(4))
        store.write(5, tiny_state(5))  # prunes step 4; what was left is not named again
    fs.invalidate_cache()
    assert sorted(fs.find(checkpoints)) == [f"{checkpoints}/step_00000002/notes.txt",
                                           f"{checkpoints}/step_00000003/plots/loss.png",
                                           f"{checkpoints}/step_00000005/manifest.json",
                                           f"{checkpoints}/step_00000005/state.pt"]
    assert store.steps() == [2, 3, 5] and store.latest()[0] == store.step_url(5)
    warnings = left_warnings(caplog)
    assert len(warnings) == 1 and "pruning left 2 files or folders" in warnings[0], warnings
    assert f"{out}/checkpoints/step_00000002/notes.txt" in warnings[0]
    assert f"{out}/checkpoints/step_00000003/plots" in warnings[0]


def overwrite_among_files_of_others(out: str, fs, root: str, caplog: pytest.LogCaptureFixture) -> None:
    """checkpoint.overwrite=true in `out` deletes the earlier run's checkpoints and keeps anyone else's files."""
    earlier = CheckpointStore(RunFolder(out), CheckpointConfig())
    for step in (10, 20):
        earlier.write(step, tiny_state(step))
    checkpoints = f"{root}/checkpoints"
    kept = [f"{checkpoints}/README.txt", f"{checkpoints}/best/model.pt", f"{checkpoints}/step_00000020/eval_notes.txt"]
    for path in kept:
        put(fs, path)
    store = CheckpointStore(RunFolder(out), CheckpointConfig(resume="none", overwrite=True))
    found, choice = store.resolve("none")
    assert found is None and choice.start_over == (10, 20)
    with caplog.at_level(logging.WARNING, logger="dist_kp.engine.checkpoint"):
        store.remove_earlier(choice)
    fs.invalidate_cache()
    assert sorted(fs.find(checkpoints)) == sorted(kept)
    assert store.latest() is None
    warnings = left_warnings(caplog)
    assert len(warnings) == 1 and "checkpoint.overwrite=true left 3 files or folders" in warnings[0], warnings
    for name in ("README.txt", "best", "step_00000020/eval_notes.txt"):
        assert f"{out}/checkpoints/{name}" in warnings[0]


def test_pruning_deletes_only_the_files_a_save_writes_and_names_the_others(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    import fsspec

    prune_among_files_of_others(str(tmp_path), fsspec.filesystem("file"), str(tmp_path), caplog)
    assert not (tmp_path / "checkpoints" / "step_00000001").exists()  # emptied folders go


def test_overwrite_deletes_only_the_earlier_runs_checkpoints_and_names_the_other_files(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import fsspec

    overwrite_among_files_of_others(str(tmp_path), fsspec.filesystem("file"), str(tmp_path), caplog)
    assert not (tmp_path / "checkpoints" / "step_00000010").exists()


def test_s3_pruning_and_overwrite_delete_only_what_dist_kp_wrote(s3_server,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    bucket = s3_server.create_bucket("only-own-files")
    with environment(**s3_server.env()):
        prune_among_files_of_others(f"s3://{bucket}/pruned", s3_server.filesystem(), f"{bucket}/pruned", caplog)
        caplog.clear()
        overwrite_among_files_of_others(f"s3://{bucket}/overwritten", s3_server.filesystem(), f"{bucket}/overwritten",
                                        caplog)


def test_a_failed_background_save_is_raised_by_the_next_save(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").write_text("a file where the checkpoint folder should be")
    store = make_store(tmp_path)
    store.save(1, tiny_state(1))  # returns at once; the write fails in the background
    with pytest.raises(CheckpointError, match="checkpoints/step_00000001"):
        store.save(2, tiny_state(2))
    store.wait()  # the failed save was reported once; nothing is in flight


def secrets_in_tree(root: Path) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if ACCESS_KEY.encode() in data or SECRET_KEY.encode() in data:
                hits.append(str(path))
    return hits


def s3_env(server, **keys: str) -> dict:
    return child_env(**server.env(**keys))


def test_s3_kill_and_resume_ends_identical_and_leaks_no_secret(s3_server, straight_run: Path, synthetic_root: Path,
                                                               tmp_path: Path) -> None:
    bucket = s3_server.create_bucket("resume-test")
    out = f"s3://{bucket}/run"
    env = s3_env(s3_server)
    first = start_module("dist_kp.train", train_args(synthetic_root, out, workers=1), nproc=2, env=env)
    log, last_saved = kill_between_checkpoints(first, 7)
    result = check(run_module("dist_kp.train", train_args(synthetic_root, out, workers=1), nproc=2, env=env))
    assert resumed_at(result.stderr) >= last_saved
    assert_same_training(final_state(str(straight_run)), final_state(out, s3_server.env()))
    assert ACCESS_KEY not in log + result.stderr and SECRET_KEY not in log + result.stderr
    local_copy = tmp_path / "downloaded"
    s3_server.filesystem().get(f"{bucket}/run", str(local_copy), recursive=True)
    assert (local_copy / "config.yaml").exists() and list((local_copy / "metrics").glob("part-*.jsonl"))
    assert secrets_in_tree(local_copy) == []


def test_s3_bad_credentials_fail_fast_naming_the_url(s3_server, synthetic_root: Path) -> None:
    bucket = s3_server.create_bucket("badcreds")
    env = s3_env(s3_server, secret_key="wrong-secret")
    started = time.monotonic()
    result = run_module("dist_kp.train", train_args(synthetic_root, f"s3://{bucket}/run", 0), env=env, timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    assert f"s3://{bucket}/run" in result.stderr and "access denied" in result.stderr
    assert "wrong-secret" not in result.stderr


# The frozen-server run's request timeout, and the longest one request then takes to fail.
FROZEN_TIMEOUT_S = 2
REQUEST_BOUND_S = Storage(timeout_s=FROZEN_TIMEOUT_S).request_limit_s
# Requests that may each run into the timeout before the run gives up: the save in flight, the next
# metrics write, the last flush at exit; the rest of a bound is process time (start-up, steps, exit).
FAILING_REQUESTS = 4
# Start-up and a few steps of a process on a loaded 2-core machine: finite, where a hung write never ends.
PROCESS_TIME_S = 60


def test_s3_server_frozen_or_stopped_fails_in_bounded_time_and_keeps_the_last_checkpoint(
    tmp_path: Path, synthetic_root: Path
) -> None:
    from tests.s3_server import start_server

    (tmp_path / "own-server").mkdir()
    server = start_server(tmp_path / "own-server")
    try:
        bucket = server.create_bucket("stopped")
        out = f"s3://{bucket}/run"
        env = s3_env(server)
        args = [*train_args(synthetic_root, out, 0), f"storage.timeout_s={FROZEN_TIMEOUT_S}"]
        run = start_module("dist_kp.train", args, env=env)
        log = LogReader(run)
        log.wait_for(r"checkpoint step 4 saved")
        # Frozen: the server accepts connections but never answers (writes used to hang forever).
        os.kill(server.process.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        log.wait_for(r"not reachable")
        noticed = time.monotonic() - frozen
        text = log.finish(timeout=60)
        assert run.returncode != 0
        assert noticed < FAILING_REQUESTS * REQUEST_BOUND_S + PROCESS_TIME_S, (noticed, text[-3000:])
        assert "not reachable" in text and out in text, text[-3000:]
        os.kill(server.process.pid, signal.SIGCONT)
        saved = [int(n) for n in re.findall(r"checkpoint step (\d+) saved", text)]
        # Stopped: connections refused at once; the same command fails naming the URL, after no more
        # than the refused requests' retries and its own start-up.
        server.stop()
        started = time.monotonic()
        result = run_module("dist_kp.train", args, env=env, timeout=300)
        assert result.returncode != 0
        assert time.monotonic() - started < FAILING_REQUESTS * REQUEST_BOUND_S + PROCESS_TIME_S
        assert "not reachable" in result.stderr and out in result.stderr
        # Right after the restart the server answers 500 InternalError until its volume server
        # serves reads: the store retries that (storage.timeout_s) instead of failing the resume.
        server.start()
        with environment(**server.env()):
            store = CheckpointStore(RunFolder(out), CheckpointConfig())
            url, state = store.latest()
            assert url.endswith(f"step_{saved[-1]:08d}") and state["progress"]["step"] == saved[-1]
            store.abort_unfinished_uploads()
        assert server.filesystem().call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []
    finally:
        if server.process:
            os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


def test_choosing_a_checkpoint_is_a_pure_function_of_the_manifests() -> None:
    def url(step: int) -> str:
        return f"s3://b/run/checkpoints/step_{step:08d}"

    old = {"lineage": "aaa", "origin": None, "created": 1.0}
    branch = {"lineage": "bbb", "origin": url(2), "created": 2.0}
    valid = [(4, old), (3, branch)]  # oldest written first: the branch's step 3 is the newest
    auto = choose_checkpoint("auto", False, valid, [2, 3, 4, 5], url)
    assert [(c.url, c.lineage) for c in auto.candidates] == [(url(3), "bbb"), (url(4), "aaa")]
    assert auto.explicit is None and auto.start_over == ()
    explicit = choose_checkpoint(url(2), False, valid, [2, 3, 4, 5], url)
    assert [c.url for c in explicit.candidates] == [url(3)] and explicit.explicit == url(2)
    first = choose_checkpoint(url(4), False, valid, [2, 3, 4, 5], url)
    assert first.candidates == () and first.explicit == url(4)
    assert choose_checkpoint("none", True, valid, [2, 3, 4, 5], url).start_over == (2, 3, 4, 5)
    assert choose_checkpoint("none", False, [], [], url) == ResumeChoice()
    with pytest.raises(CheckpointError, match=r"s3://b/run/checkpoints already holds checkpoints"):
        choose_checkpoint("none", False, valid, [2, 3, 4, 5], url)
