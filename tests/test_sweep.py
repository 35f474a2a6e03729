"""dist-kp sweep: trials of a grid on SLURM (one job array, preemption and requeue per trial) or locally,
the manifest that makes the same command continue, and --status (table, summary.csv, summary.png)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import time
from pathlib import Path

import pytest

from dist_kp import sweep
from dist_kp.storage.lease import Holder
from tests.conftest import TINY_CONFIG, environment, wait_until

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRID = ["--grid", "optim.lr=[0.01,0.02]", "--grid", "train.batch_size=[2,4]"]


def trial_overrides(data_root: Path, *extra: str) -> list[str]:
    """The tiny config's overrides for every trial (the sweep sets output_dir itself)."""
    return [f"data.root={data_root}", "train.log_every=1", "train.workers=0", "eval.every_epochs=0",
            "eval.at_end=true", "eval.max_images=4", *extra]


def read_summary(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((folder / sweep.SUMMARY_CSV).read_text())))


def kp_ap(trial_dir: Path, step: int) -> float:
    return json.loads((trial_dir / "eval" / f"{step:08d}" / "metrics.json").read_text())["kp/AP"]


def job_counts(folder: Path) -> dict[str, int]:
    return {trial["name"]: len(trial["jobs"]) for trial in json.loads((folder / "sweep.json").read_text())["trials"]}


# --- planning and continuing (no process started) ---


def test_the_grid_is_every_combination_in_order_each_a_trial_with_its_own_folder_and_wandb_run(tmp_path: Path) -> None:
    planned = sweep.plan(str(TINY_CONFIG), tmp_path / "lr", sweep.parse_grid(GRID[1::2]), ["train.max_steps=2"])
    assert [(t.name, t.overrides) for t in planned.trials] == [
        ("trial-000", ["optim.lr=0.01", "train.batch_size=2"]), ("trial-001", ["optim.lr=0.01", "train.batch_size=4"]),
        ("trial-002", ["optim.lr=0.02", "train.batch_size=2"]), ("trial-003", ["optim.lr=0.02", "train.batch_size=4"])]
    from dist_kp.config import load_config

    cfg = load_config(planned.config, planned.run_overrides(planned.trials[3]))
    assert (cfg.optim.lr, cfg.train.batch_size, cfg.train.max_steps) == (0.02, 4, 2)
    assert cfg.output_dir == str(tmp_path / "lr" / "trial-003")
    assert (cfg.tracking.group, cfg.tracking.name) == ("lr", "lr-trial-003")  # one W&B group, a run per trial
    grouped = sweep.plan(str(TINY_CONFIG), tmp_path / "lr", {"optim.lr": [0.01]}, ["tracking.group=my-sweep"])
    assert load_config(grouped.config, grouped.run_overrides(grouped.trials[0])).tracking.name == "my-sweep-trial-000"


def test_random_draws_n_distinct_points_the_seed_decides_and_the_same_command_reuses_the_recorded_seed(
        tmp_path: Path) -> None:
    grid = {"optim.lr": [0.01, 0.02, 0.03], "train.batch_size": [2, 4]}
    drawn = sweep.plan(str(TINY_CONFIG), tmp_path / "s", grid, [], count=3, seed=11)
    again = sweep.plan(str(TINY_CONFIG), tmp_path / "s", grid, [], count=3, seed=11)
    every = [t.overrides for t in sweep.plan(str(TINY_CONFIG), tmp_path / "s", grid, []).trials]
    points = [t.overrides for t in drawn.trials]
    assert points == [t.overrides for t in again.trials] and len(set(map(tuple, points))) == 3
    assert set(map(tuple, points)) <= set(map(tuple, every))
    assert {tuple(t.overrides) for seed in range(20)
            for t in sweep.plan(str(TINY_CONFIG), tmp_path / "s", grid, [], count=3, seed=seed).trials} == \
        set(map(tuple, every))  # any point can be drawn
    sweep.continue_or_start(drawn)
    args = sweep.parse_args(["--config", str(TINY_CONFIG), "--out", str(tmp_path / "s"), "--grid", "optim.lr=[1]",
                             "--random", "3", "--local"])
    assert sweep.seed_for(args, tmp_path / "s") == 11  # recorded in sweep.json


def test_the_same_folder_with_another_grid_is_refused_naming_the_difference_and_the_recorded_command(
        tmp_path: Path) -> None:
    first = sweep.continue_or_start(sweep.plan(str(TINY_CONFIG), tmp_path / "s", {"optim.lr": [0.01, 0.02]},
                                               ["train.max_steps=2"]))
    first.trials[0].jobs.append({"id": "41", "where": "local"})
    first.save()
    same = sweep.continue_or_start(sweep.plan(str(TINY_CONFIG), tmp_path / "s", {"optim.lr": [0.01, 0.02]},
                                              ["train.max_steps=2"]))
    assert same.trials[0].jobs == [{"id": "41", "where": "local"}]  # the recorded sweep, with its jobs
    with pytest.raises(sweep.SweepError) as refused:
        sweep.continue_or_start(sweep.plan(str(TINY_CONFIG), tmp_path / "s", {"optim.lr": [0.01, 0.03]},
                                           ["train.max_steps=2"]))
    message = str(refused.value)
    assert 'grid: recorded {"optim.lr": [0.01, 0.02]}, given {"optim.lr": [0.01, 0.03]}' in message
    assert "--grid optim.lr=[0.01,0.02] train.max_steps=2" in message and "or choose another --out" in message
    with pytest.raises(sweep.SweepError, match=r"overrides: recorded \[\"train.max_steps=2\"\], given \[\]"):
        sweep.continue_or_start(sweep.plan(str(TINY_CONFIG), tmp_path / "s", {"optim.lr": [0.01, 0.02]}, []))


@pytest.mark.parametrize("grid, overrides, count, message", [
    (["optim.lr=0.01"], [], None, r"--grid optim.lr=0.01: expected KEY=\[VALUE,VALUE,...\]"),
    (["optim.lr=[]"], [], None, r"a YAML list of at least one value"),
    (["optim.lr=[0.1]", "optim.lr=[0.2]"], [], None, r"--grid optim.lr is given twice"),
    (["optim.lr=[0.1]"], ["optim.lr=0.3"], None, r"optim.lr is both swept \(--grid\) and set for every trial"),
    (["optim.lr=[0.1]"], ["output_dir=runs/x"], None, r"output_dir is set by the sweep"),
    (["optim.lr=[0.1]"], ["tracking.name=x"], None, r"tracking.name is set by the sweep"),
    (["optim.lr=[0.1,0.2]"], [], 3, r"--random 3: the grid has 2 points; choose 1 to 2"),
])
def test_a_grid_the_sweep_cannot_run_is_refused_naming_the_option(tmp_path: Path, grid: list[str],
                                                                   overrides: list[str], count: int | None,
                                                                   message: str) -> None:
    with pytest.raises(sweep.SweepError, match=message):
        sweep.plan(str(TINY_CONFIG), tmp_path, sweep.parse_grid(grid), overrides, count, seed=0)


def test_a_grid_value_the_config_refuses_names_the_trial_before_anything_is_written(tmp_path: Path,
                                                                                     capsys) -> None:
    status = sweep.main(["--config", str(TINY_CONFIG), "--out", str(tmp_path / "s"), "--grid",
                         "optim.lr=[0.01,-1]", "--local"])
    assert status == 2
    assert not (tmp_path / "s").exists()
    with pytest.raises(SystemExit):
        sweep.main(["--config", str(TINY_CONFIG), "--out", str(tmp_path / "s"), "--grid", "optim.lr=[1]"])
    assert "or --local (or --status SWEEP_DIR)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--config", str(TINY_CONFIG), "--out", str(tmp_path / "s"), "--grid", "optim.lr=[1]", "--local",
                    "--seed", "3"])
    assert "--seed chooses the points of --random N: give --random too" in capsys.readouterr().err


def test_a_trial_the_config_refuses_is_named_with_its_overrides(tmp_path: Path) -> None:
    from dist_kp.config import ConfigError

    with pytest.raises(ConfigError, match=r"(?s)trial-000 \(optim.lrr=0.01\): invalid configuration .*optim.lrr: unknown"):
        sweep.plan(str(TINY_CONFIG), tmp_path, {"optim.lrr": [0.01, 0.02]}, [])
    with pytest.raises(ConfigError, match=r"(?s)trial-001 \(optim.lr=-1\): invalid configuration .*optim.lr: "):
        sweep.plan(str(TINY_CONFIG), tmp_path, {"optim.lr": [0.01, -1]}, [])


# --- the state of a trial ---


@pytest.mark.parametrize("finished, started, submitted, lease, queue, error, expected", [
    (True, True, True, False, None, None, "finished"),
    (True, True, True, False, sweep.QueueEntry("COMPLETING"), None, "finished"),
    (False, True, True, False, sweep.QueueEntry("RUNNING"), None, "running"),
    (False, True, True, True, None, None, "running"),  # a local run: its lease is held
    (False, False, True, False, sweep.QueueEntry("PENDING"), None, "pending"),
    (False, True, True, False, sweep.QueueEntry("PENDING", restarts=1), None, "preempted-requeued"),
    (False, False, True, False, sweep.QueueEntry("REQUEUED", restarts=1), None, "preempted-requeued"),
    (False, True, True, False, sweep.QueueEntry("PENDING"), None, "preempted-requeued"),  # requeued by submitit
    (False, True, True, False, sweep.QueueEntry("FAILED"), None, "failed"),
    (False, True, True, False, sweep.QueueEntry("CANCELLED"), None, "failed"),
    (False, True, True, False, None, "RuntimeError: training exited with status 1", "failed"),
    (False, True, True, False, None, None, "stopped"),  # SLURM forgot the job: it is not coming back
    (False, True, True, False, sweep.QueueEntry("COMPLETED"), None, "stopped"),
    (False, False, False, False, None, None, "not submitted"),
])
def test_the_state_of_a_trial_follows_from_its_folder_its_job_and_its_result(
        finished, started, submitted, lease, queue, error, expected) -> None:
    assert sweep.trial_state(finished, started, submitted, lease, queue, error) == expected


def test_scontrols_records_of_a_job_array_are_keyed_by_submitits_job_ids() -> None:
    text = ("JobId=101 JobName=sweep ArrayJobId=100 ArrayTaskId=1 ArrayTaskThrottle=3 JobState=RUNNING "
            "Reason=None Restarts=0\n"
            "JobId=102 JobName=sweep ArrayJobId=100 ArrayTaskId=2 JobState=PENDING Reason=BeginTime Restarts=1\n"
            "JobId=100 JobName=sweep ArrayJobId=100 ArrayTaskId=3-4,6%3 JobState=PENDING Reason=JobArrayTaskLimit\n"
            "JobId=200 JobName=alone JobState=COMPLETED Restarts=0\n")
    assert sweep.parse_job_records(text) == {
        "100_1": sweep.QueueEntry("RUNNING", 0), "100_2": sweep.QueueEntry("PENDING", 1),
        "100_3": sweep.QueueEntry("PENDING", 0), "100_4": sweep.QueueEntry("PENDING", 0),
        "100_6": sweep.QueueEntry("PENDING", 0), "200": sweep.QueueEntry("COMPLETED", 0)}


def write_trial(folder: Path, steps: int, evaluations: dict[int, float], final: bool = False) -> None:
    (folder / "eval").mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n"
                                                  for s in range(1, steps + 1)))
    for step, value in evaluations.items():
        (folder / "eval" / f"{step:08d}").mkdir()
        (folder / "eval" / f"{step:08d}" / "metrics.json").write_text(json.dumps({"step": step, "kp/AP": value,
                                                                                  "bbox/AP": 0.5}))
    if final:
        (folder / "model_final.pt").write_bytes(b"weights")


def test_status_reads_each_trial_folder_and_prints_the_table_and_writes_summary_csv_and_png(
        tmp_path: Path, capsys) -> None:
    from submitit.core.utils import cloudpickle_dump

    planned = sweep.continue_or_start(sweep.plan(str(TINY_CONFIG), tmp_path / "s", {"optim.lr": [0.1, 0.2, 0.3, 0.4]},
                                                 []))
    root = tmp_path / "s"
    write_trial(root / "trial-000", 8, {4: 0.25, 8: 0.125}, final=True)
    write_trial(root / "trial-001", 3, {})
    now = time.time()  # a live run (pid 1, on this machine) holds trial-001's folder
    (root / "trial-001" / "lease.json").write_text(json.dumps(dataclasses.asdict(
        dataclasses.replace(Holder.this_process(now), pid=1))))
    write_trial(root / "trial-002", 5, {})
    (root / "submitit").mkdir()
    cloudpickle_dump(("error", "Traceback ...\nRuntimeError: training exited with status 1\n"),
                     root / "submitit" / "777_0_result.pkl")
    planned.trials[0].jobs.append({"id": "775", "where": "local"})
    planned.trials[1].jobs.append({"id": "776", "where": "local"})
    planned.trials[2].jobs.append({"id": "777", "where": "local"})
    planned.save()
    assert sweep.main(["--status", str(root)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["trial", "overrides", "state", "step", "best", "kp/AP"]
    assert [line.split()[:4] for line in table[1:]] == [
        ["trial-000", "optim.lr=0.1", "finished", "8"], ["trial-001", "optim.lr=0.2", "running", "3"],
        ["trial-002", "optim.lr=0.3", "failed", "5"], ["trial-003", "optim.lr=0.4", "not", "submitted"]]
    assert table[1].endswith("0.2500 (step 4)") and table[2].endswith(" -")
    rows = read_summary(root)
    assert list(rows[0]) == sweep.COLUMNS
    assert [(r["trial"], r["state"], r["step"], r["best kp/AP"], r["best at step"], r["job"]) for r in rows] == [
        ("trial-000", "finished", "8", "0.25", "4", "775"), ("trial-001", "running", "3", "", "", "776"),
        ("trial-002", "failed", "5", "", "", "777"), ("trial-003", "not submitted", "", "", "", "")]
    assert rows[2]["output_dir"] == str(root / "trial-002")
    assert (root / "summary.png").read_bytes().startswith(PNG_SIGNATURE)
    statuses = sweep.sweep_status(sweep.Sweep.load(root))
    assert statuses[2].error == "RuntimeError: training exited with status 1"


def test_status_of_a_folder_without_a_sweep_says_so(tmp_path: Path, caplog) -> None:
    assert sweep.main(["--status", str(tmp_path)]) == 2
    assert f"{tmp_path}/sweep.json not found: {tmp_path} is not a sweep folder" in caplog.text


# --- running trials ---


@pytest.mark.integration  # each trial is a local process started by submitit
def test_local_sweep_runs_each_trial_to_the_end_summarizes_and_the_same_command_again_starts_none(
        synthetic_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    command = ["--config", str(TINY_CONFIG), "--out", str(out), "--grid", "optim.lr=[0.01,0.02]", "--local",
               *trial_overrides(synthetic_root, "train.max_steps=2")]
    assert sweep.main(command) == 0
    table = capsys.readouterr().out
    assert re.search(r"trial-000\s+optim.lr=0.01\s+finished\s+2\s", table), table
    assert re.search(r"trial-001\s+optim.lr=0.02\s+finished\s+2\s", table), table
    rows = read_summary(out)
    assert [(r["trial"], r["overrides"], r["state"], r["step"]) for r in rows] == [
        ("trial-000", "optim.lr=0.01", "finished", "2"), ("trial-001", "optim.lr=0.02", "finished", "2")]
    for row in rows:
        trial_dir = out / row["trial"]
        assert float(row["best kp/AP"]) == kp_ap(trial_dir, 2) and row["best at step"] == "2"
        assert [json.loads(line)["step"] for line in (trial_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
        assert f"name: sweep-{row['trial']}" in (trial_dir / "config.yaml").read_text()
        assert "group: sweep" in (trial_dir / "config.yaml").read_text()
        assert (out / "submitit" / f"{row['job']}_0_log.err").exists()
    assert (out / "summary.png").read_bytes().startswith(PNG_SIGNATURE)
    finals = {p: p.stat().st_mtime_ns for p in out.glob("trial-*/model_final.pt")}
    assert len(finals) == 2

    assert sweep.main(command) == 0  # again: nothing to run
    assert job_counts(out) == {"trial-000": 1, "trial-001": 1}
    assert {p: p.stat().st_mtime_ns for p in out.glob("trial-*/model_final.pt")} == finals


def trial_log(out: Path, job_id: str) -> str:
    path = out / "submitit" / job_id / f"{job_id}_0_log.err"
    return path.read_text() if path.exists() else ""


def trial_states(out: Path) -> dict[str, str]:
    return {s.trial.name: s.state for s in sweep.sweep_status(sweep.Sweep.load(out))}


def test_slurm_sweep_three_trials_one_preempted_and_requeued_all_finish_and_status_is_right(
        slurm, synthetic_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    command = ["--config", str(TINY_CONFIG), "--out", str(out), *GRID, "--random", "3", "--seed", "0", "--slurm",
               "--gpus-per-node", "0", "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "20", "--poll-s", "1",
               *trial_overrides(synthetic_root, "train.max_steps=12", "checkpoint.every_steps=50")]
    with environment(**slurm.env):
        assert sweep.main(command) == 0
        assert sweep.main(command) == 0  # at once again: every trial is queued or running, none is submitted twice
        assert job_counts(out) == {"trial-000": 1, "trial-001": 1, "trial-002": 1}
        manifest = json.loads((out / "sweep.json").read_text())
        jobs = {t["name"]: t["jobs"][0]["id"] for t in manifest["trials"]}
        assert len({job.split("_")[0] for job in jobs.values()}) == 1  # one job array
        preempted = jobs["trial-001"]
        wait_until(lambda: re.search(r"\] step 5 ", trial_log(out, preempted)), "trial-001 at step 5", timeout=300)
        wait_until(lambda: set(trial_states(out).values()) <= {"running", "finished"}, "every trial started")
        # Nothing starts while the partition is down: the requeued trial stays queued, as a preempted job waits.
        slurm.run("scontrol", "update", "PartitionName=debug", "State=DOWN")
        try:
            slurm.run("scancel", "--signal=USR1", preempted)  # as SLURM does before the limit: to the job's steps
            wait_until(lambda: "checkpoint saved, SLURM job" in trial_log(out, preempted), "trial-001 requeued")
            states = wait_until(lambda: (s := trial_states(out))["trial-001"] == "preempted-requeued" and s,
                                "trial-001 shown as preempted-requeued", timeout=120)
            assert sweep.main(["--status", str(out)]) == 0
            assert re.search(r"trial-001\s+\S+\s+\S+\s+preempted-requeued\s+\d+", capsys.readouterr().out)
            assert states["trial-001"] == "preempted-requeued"
        finally:
            slurm.run("scontrol", "update", "PartitionName=debug", "State=UP")
        capsys.readouterr()
        assert sweep.main([*command, "--wait"]) == 0  # the same command again: continues, waits, summarizes
        table = capsys.readouterr().out
        assert sweep.main(["--status", str(out)]) == 0
        assert capsys.readouterr().out == table
        assert slurm.job(preempted).get("Restarts") == "1"
    assert job_counts(out) == {"trial-000": 1, "trial-001": 1, "trial-002": 1}
    points = [t["overrides"] for t in manifest["trials"]]
    rows = read_summary(out)
    assert [(r["trial"], r["overrides"].split(), r["state"], r["step"], r["job"]) for r in rows] == [
        (name, point, "finished", "12", jobs[name]) for name, point in zip(jobs, points)]
    for row in rows:
        assert float(row["best kp/AP"]) == kp_ap(out / row["trial"], 12)
        assert re.search(rf"{row['trial']}\s+{re.escape(row['overrides'])}\s+finished\s+12\s+"
                         rf"{float(row['best kp/AP']):.4f} \(step 12\)", table), table
    log = trial_log(out, preempted)
    assert "stopped by SIGUSR1: checkpoint saved, SLURM job" in log and "restart count 1" in log
    saved = int(re.findall(r"checkpoint step (\d+) saved", log)[0])
    assert re.search(rf"resumed from {out}/trial-001/checkpoints/step_{saved:08d} at step {saved} ", log), log[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "trial-001" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    assert (out / "summary.png").read_bytes().startswith(PNG_SIGNATURE)
