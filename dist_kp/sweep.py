"""Hyper-parameter sweeps: one training per point of a grid, each in its own output_dir, on SLURM as one job array.

usage:
  dist-kp sweep --config CONFIG --out SWEEP_DIR --grid optim.lr=[0.01,0.02] --grid train.batch_size=[2,4] \\
      [--random N [--seed S]] (--slurm [SLURM options] [--wait] | --local) [section.key=value ...]
  dist-kp sweep --status SWEEP_DIR

Each point of the grid (every combination, or N of them drawn at random: --random N, the seed
recorded) is a trial. SWEEP_DIR/trial-000, trial-001, ... is its output_dir; its W&B run is named
<group>-trial-000 in the W&B group <group> (tracking.group, by default the name of SWEEP_DIR). The
overrides after the options apply to every trial. SWEEP_DIR/sweep.json records the sweep: config,
grid, overrides, seed, and each trial's overrides and jobs.

--slurm submits the trials as one SLURM job array through submitit, each with the request of
`dist-kp submit` (--requeue, SIGUSR1 --signal-delay before the end): a preempted trial checkpoints,
is requeued and resumes from its own checkpoints. --wait then waits for the trials to end. --local
runs them one after the other in local processes and waits. submitit's logs go to SWEEP_DIR/submitit/.

Running the same command again continues the sweep: finished trials and trials SLURM still holds
(queued or running) are left alone, the others (failed, stopped, never submitted) are submitted
again and resume from their checkpoints. Another config, grid, set of overrides or seed is refused.

--status prints one line per trial (trial, overrides, state, step, best kp/AP) and writes
SWEEP_DIR/summary.csv and SWEEP_DIR/summary.png (kp/AP of each trial over the steps, and its best);
so does the sweep command once its trials end. The states, read from the trial folders, submitit's
results and `scontrol show job` (no accounting needed):
  finished            OUTPUT_DIR/model_final.pt is written
  running             SLURM runs the trial's job, or a live run holds the trial folder's lease
  preempted-requeued  queued again after a preemption (the job restarted, or the trial has progress)
  pending             queued, not started yet
  failed              the job failed: submitit's result holds an error, or SLURM says FAILED, CANCELLED, ...
  stopped             started, but neither finished, nor running, nor queued, and no error recorded
  not submitted       no job yet
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_kp.cli import as_process
from dist_kp.config import ConfigError, load_config
from dist_kp.config.packaged import resolve_config
from dist_kp.report import ReportError, load_history
from dist_kp.storage import StorageError, is_local_url, local_path
from dist_kp.storage.lease import Holder, RunFolderInUse, lease_decision, read_holder
from dist_kp.storage.run_folder import RunFolder
from dist_kp.submit import TrainingJob, add_slurm_arguments, build_executor

log = logging.getLogger("dist_kp.sweep")

MANIFEST = "sweep.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_PNG = "summary.png"
SUBMITIT = "submitit"
AP_KEY = "kp/AP"

FINISHED, RUNNING, REQUEUED, PENDING = "finished", "running", "preempted-requeued", "pending"
FAILED, STOPPED, NOT_SUBMITTED = "failed", "stopped", "not submitted"
# States of a trial that goes on by itself: the sweep neither submits it again nor stops waiting for it.
UNDER_WAY = (RUNNING, REQUEUED, PENDING)

# SLURM job states (`scontrol show job`) by what they mean for a trial.
SLURM_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED"}
SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING"}
SLURM_FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY",
                "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}


class SweepError(ValueError):
    """A sweep that cannot be planned, continued or read; the message names the option, the file or the trial."""


@dataclass
class Trial:
    """One point of the grid: its name (its folder under SWEEP_DIR) and its overrides; the jobs that ran it."""

    name: str
    overrides: list[str]
    jobs: list[dict[str, str]] = field(default_factory=list)  # {"id": submitit's job id, "where": slurm|local}

    @property
    def job(self) -> dict[str, str] | None:
        return self.jobs[-1] if self.jobs else None


@dataclass
class Sweep:
    """What SWEEP_DIR/sweep.json records."""

    folder: Path
    config: str
    grid: dict[str, list[Any]]
    overrides: list[str]
    random: int | None
    seed: int | None
    group: str
    trials: list[Trial]

    IDENTITY = ("config", "grid", "overrides", "random", "seed")

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST

    @property
    def logs(self) -> Path:
        return self.folder / SUBMITIT

    def output_dir(self, trial: Trial) -> str:
        return str(self.folder / trial.name)

    def run_overrides(self, trial: Trial) -> list[str]:
        """The training's overrides for `trial`: the sweep's, the trial's point, its folder and W&B run."""
        return [*self.overrides, *trial.overrides, f"output_dir={self.output_dir(trial)}",
                f"tracking.group={json.dumps(self.group)}", f"tracking.name={json.dumps(f'{self.group}-{trial.name}')}"]

    def command(self) -> str:
        """The sweep command that made this sweep (its SLURM or local options left out)."""
        grid = " ".join(f"--grid {key}={json.dumps(values, separators=(',', ':'))}" for key, values in self.grid.items())
        chosen = f" --random {self.random} --seed {self.seed}" if self.random else ""
        return f"dist-kp sweep --config {self.config} --out {self.folder} {grid}{chosen} {' '.join(self.overrides)}".strip()

    def to_json(self) -> str:
        data = asdict(self)
        data["folder"] = str(self.folder)
        return json.dumps(data, indent=1)

    @classmethod
    def load(cls, folder: Path) -> Sweep:
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text())
            data["trials"] = [Trial(**trial) for trial in data["trials"]]
            data["folder"] = folder
            return cls(**data)
        except FileNotFoundError:
            raise SweepError(f"{path} not found: {folder} is not a sweep folder (`dist-kp sweep --out {folder} ...` "
                             "makes one)") from None
        except (ValueError, TypeError, KeyError) as error:
            raise SweepError(f"{path} is not a sweep manifest ({type(error).__name__}: {error})") from None

    def save(self) -> None:
        """Write sweep.json whole: a temporary file renamed over it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.manifest.with_name(f"{MANIFEST}.tmp-{os.getpid()}")
        temporary.write_text(self.to_json())
        os.replace(temporary, self.manifest)


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`["optim.lr=[0.01,0.02]", ...]` -> {"optim.lr": [0.01, 0.02]}: YAML lists of at least one value."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        try:
            values = yaml.safe_load(raw) if sep else None
        except yaml.YAMLError:
            values = None
        if not key or not isinstance(values, list) or not values:
            raise SweepError(f"--grid {item}: expected KEY=[VALUE,VALUE,...], a YAML list of at least one value, "
                             "e.g. --grid optim.lr=[0.01,0.02]")
        if key in grid:
            raise SweepError(f"--grid {key} is given twice: give all its values in one list")
        grid[key] = values
    return grid


def override_key(item: str) -> str:
    return item.partition("=")[0]


def check_overrides(grid: dict[str, list[Any]], overrides: list[str]) -> None:
    """Refuse what the sweep sets itself (output_dir, tracking.name), and a key both swept and fixed."""
    for key in [*grid, *map(override_key, overrides)]:
        if key == "output_dir":
            raise SweepError("output_dir is set by the sweep, SWEEP_DIR/<trial> for each trial: drop it (choose --out)")
        if key == "tracking.name":
            raise SweepError("tracking.name is set by the sweep, <group>-<trial> for each trial: drop it "
                             "(tracking.group names the sweep's W&B group)")
    fixed = [item for item in overrides if override_key(item) in grid]
    if fixed:
        raise SweepError(f"{override_key(fixed[0])} is both swept (--grid) and set for every trial ({fixed[0]}): "
                         "drop one of them")


def grid_size(grid: dict[str, list[Any]]) -> int:
    return math.prod(len(values) for values in grid.values())


def grid_point(grid: dict[str, list[Any]], index: int) -> list[str]:
    """The overrides of point `index` of the grid, in the order of itertools.product (the last key varies fastest)."""
    overrides = []
    for key, values in reversed(grid.items()):
        index, position = divmod(index, len(values))
        overrides.append(f"{key}={json.dumps(values[position])}")
    return overrides[::-1]


def chosen_points(grid: dict[str, list[Any]], count: int | None, seed: int | None) -> list[int]:
    """Every point of the grid, or `count` of them drawn with `seed` (in grid order)."""
    size = grid_size(grid)
    if count is None:
        return list(range(size))
    if not 1 <= count <= size:
        raise SweepError(f"--random {count}: the grid has {size} points; choose 1 to {size}")
    return sorted(random.Random(seed).sample(range(size), count))


def plan(config: str, folder: Path, grid: dict[str, list[Any]], overrides: list[str], count: int | None = None,
         seed: int | None = None) -> Sweep:
    """The sweep these arguments describe; every trial's config is loaded (a bad key fails here, naming the trial)."""
    check_overrides(grid, overrides)
    if count is None:
        seed = None
    config = str(Path(resolve_config(config)).resolve())
    base = load_config(config, overrides)
    group = base.tracking.group or folder.name
    points = chosen_points(grid, count, seed)
    width = max(3, len(str(len(points) - 1)))
    trials = [Trial(f"trial-{number:0{width}d}", grid_point(grid, index)) for number, index in enumerate(points)]
    sweep = Sweep(folder, config, grid, list(overrides), count, seed, group, trials)
    for trial in trials:
        try:
            load_config(config, sweep.run_overrides(trial))
        except ConfigError as error:
            raise ConfigError(f"{trial.name} ({' '.join(trial.overrides)}): {error}") from None
    return sweep


def continue_or_start(planned: Sweep) -> Sweep:
    """The recorded sweep when SWEEP_DIR has one made by the same arguments (refused otherwise), else `planned`, saved."""
    if not planned.manifest.exists():
        planned.save()
        return planned
    recorded = Sweep.load(planned.folder)
    differences = [f"  {key}: recorded {json.dumps(getattr(recorded, key))}, given {json.dumps(getattr(planned, key))}"
                   for key in Sweep.IDENTITY if getattr(recorded, key) != getattr(planned, key)]
    if differences:
        raise SweepError("\n".join([f"{planned.manifest} records another sweep:", *differences,
                                    f"continue it with: {recorded.command()} (and --slurm or --local), "
                                    "or choose another --out"]))
    return recorded


# --- the state of a trial ---


@dataclass(frozen=True)
class QueueEntry:
    """What SLURM says of a job: its state and how often it was requeued."""

    state: str
    restarts: int = 0


def task_ids(text: str) -> list[int]:
    """The task ids of a pending array record: `0-2%3` -> [0, 1, 2], `1,4-5` -> [1, 4, 5]."""
    ids: list[int] = []
    for part in text.split("%")[0].split(","):
        first, _, last = part.partition("-")
        ids += range(int(first), int(last or first) + 1)
    return ids


def parse_job_records(text: str) -> dict[str, QueueEntry]:
    """`scontrol show job -o` output -> {job id as submitit names it ("123", or "123_4" in an array): entry}."""
    found = {}
    for line in text.splitlines():
        fields = dict(token.partition("=")[::2] for token in line.split())
        if "JobId" not in fields:
            continue
        restarts = fields.get("Restarts", "0")
        entry = QueueEntry(fields.get("JobState", "UNKNOWN"), int(restarts) if restarts.isdigit() else 0)
        array, tasks = fields.get("ArrayJobId"), fields.get("ArrayTaskId")
        if array and tasks:
            found.update({f"{array}_{task}": entry for task in task_ids(tasks)})
        else:
            found[fields["JobId"]] = entry
    return found


def slurm_queue(job_ids: list[str]) -> dict[str, QueueEntry]:
    """SLURM's entries of these jobs (`scontrol show job`, which needs no accounting); a job it has forgotten is absent."""
    found: dict[str, QueueEntry] = {}
    for array in sorted({job.split("_")[0] for job in job_ids}):
        try:
            result = subprocess.run(["scontrol", "show", "job", "-o", array], capture_output=True, text=True,
                                    timeout=60)
        except (OSError, subprocess.SubprocessError) as error:
            log.warning("cannot ask SLURM about jobs %s (%s): their states come from the trial folders only",
                        ", ".join(job_ids), error)
            return found
        if result.returncode == 0:  # else "Invalid job id": gone from slurmctld's memory (MinJobAge)
            found.update(parse_job_records(result.stdout))
    return found


def trial_state(finished: bool, started: bool, submitted: bool, lease_held: bool, queue: QueueEntry | None,
                error: str | None) -> str:
    """The state of a trial from what can be observed (see the module's docstring)."""
    if finished:
        return FINISHED
    if lease_held or (queue is not None and queue.state in SLURM_RUNNING):
        return RUNNING
    if queue is not None and queue.state in SLURM_QUEUED:
        return REQUEUED if queue.restarts or started else PENDING
    if error is not None or (queue is not None and queue.state in SLURM_FAILED):
        return FAILED
    return STOPPED if submitted else NOT_SUBMITTED


@dataclass
class TrialStatus:
    trial: Trial
    output_dir: str
    state: str
    step: int | None  # the newest logged step
    kp_ap: dict[int, float]  # kp/AP of each evaluation, by step
    error: str | None = None

    @property
    def best(self) -> tuple[int, float] | None:
        """(step, kp/AP) of the best evaluation; NaN never is."""
        points = [(value, step) for step, value in self.kp_ap.items() if not math.isnan(value)]
        if not points:
            return None
        value, step = max(points, key=lambda p: (p[0], -p[1]))
        return step, value


def job_error(sweep: Sweep, job: dict[str, str]) -> str | None:
    """The last line of the error submitit recorded for the job, None when it recorded none (or a success)."""
    from submitit.core.utils import JobPaths, pickle_load

    folder = sweep.logs / "%j" if job["where"] == "slurm" else sweep.logs
    path = JobPaths(folder, job["id"]).result_pickle
    if not path.exists():
        return None
    try:
        outcome, result = pickle_load(path)
    except Exception as error:  # noqa: BLE001 - a cut or foreign pickle is reported, not raised
        return f"{path} unreadable: {error}"
    if outcome == "success":
        return None
    lines = [line for line in str(result).splitlines() if line.strip()]
    return lines[-1].strip() if lines else str(result)


def lease_held(folder: RunFolder) -> bool:
    """True while a live run holds the folder's lease (the decision a new start would take: refuse)."""
    try:
        holder = read_holder(folder)
    except RunFolderInUse:  # not a lease: nothing runs by it
        return False
    now = time.time()
    return holder is not None and lease_decision(holder, Holder.this_process(now), now).action == "refuse"


def trial_status(sweep: Sweep, trial: Trial, queue: dict[str, QueueEntry]) -> TrialStatus:
    folder = RunFolder(sweep.output_dir(trial))
    try:
        history = load_history(folder.url)
        steps = [record["step"] for record in history.records if "step" in record]
        step = max([*steps, *history.evaluations]) if steps or history.evaluations else None
        kp_ap = {s: metrics[AP_KEY] for s, metrics in history.evaluations.items() if AP_KEY in metrics}
    except ReportError:  # nothing logged yet
        step, kp_ap = None, {}
    job = trial.job
    error = job_error(sweep, job) if job else None
    entry = queue.get(job["id"]) if job and job["where"] == "slurm" else None
    started = step is not None or bool(folder.checkpoint_steps())
    state = trial_state(folder.exists(folder.model_final), started, job is not None, lease_held(folder), entry, error)
    if state == FAILED and error is None and entry is not None:
        error = f"SLURM job {job['id']} is {entry.state}"
    return TrialStatus(trial, folder.url, state, step, kp_ap, error if state == FAILED else None)


def sweep_status(sweep: Sweep) -> list[TrialStatus]:
    """Every trial's status, SLURM asked once per job array."""
    slurm_jobs = [t.job["id"] for t in sweep.trials if t.job and t.job["where"] == "slurm"]
    queue = slurm_queue(slurm_jobs) if slurm_jobs else {}
    return [trial_status(sweep, trial, queue) for trial in sweep.trials]


# --- the summary: a table, summary.csv, summary.png ---

COLUMNS = ["trial", "overrides", "state", "step", "best kp/AP", "best at step", "job", "output_dir"]


def summary_rows(statuses: list[TrialStatus]) -> list[list[str]]:
    rows = []
    for status in statuses:
        best = status.best
        job = status.trial.job
        rows.append([status.trial.name, " ".join(status.trial.overrides), status.state,
                     "" if status.step is None else str(status.step), "" if best is None else repr(best[1]),
                     "" if best is None else str(best[0]), job["id"] if job else "", status.output_dir])
    return rows


def format_table(statuses: list[TrialStatus]) -> str:
    """The table --status prints: trial, overrides, state, step, best kp/AP (with its step)."""
    header = ["trial", "overrides", "state", "step", "best kp/AP"]
    lines = [[s.trial.name, " ".join(s.trial.overrides), s.state, "-" if s.step is None else str(s.step),
              "-" if s.best is None else f"{s.best[1]:.4f} (step {s.best[0]})"] for s in statuses]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *lines])


def summary_csv(statuses: list[TrialStatus]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(summary_rows(statuses))
    return buffer.getvalue()


def summary_png(statuses: list[TrialStatus], title: str) -> bytes:
    """kp/AP of each trial over the steps (left) and each trial's best (right)."""
    from matplotlib.figure import Figure  # drawn without pyplot: no GUI backend, no global state

    fig = Figure(figsize=(12, 1.5 + 0.35 * max(len(statuses), 4)), layout="constrained")
    fig.suptitle(f"sweep {title}: keypoint AP (OKS)")
    curves, bars = fig.subplots(1, 2)
    for status in statuses:
        if status.kp_ap:
            steps = sorted(status.kp_ap)
            curves.plot(steps, [status.kp_ap[s] for s in steps], marker="o", label=status.trial.name)
    curves.set_xlabel("global step")
    curves.set_ylabel(AP_KEY)
    curves.grid(alpha=0.3)
    if any(status.kp_ap for status in statuses):
        curves.legend(fontsize="small")
    labels = [f"{s.trial.name}: {' '.join(s.trial.overrides)} ({s.state})" for s in statuses]
    values = [s.best[1] if s.best else 0.0 for s in statuses]
    bars.barh(labels, values, color="tab:blue")
    bars.set_xlim(0, max([0.01, *values]) * 1.1)
    bars.invert_yaxis()
    bars.set_xlabel(f"best {AP_KEY} (none yet: 0)")
    bars.tick_params(axis="y", labelsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_summary(sweep: Sweep, statuses: list[TrialStatus]) -> str:
    """Write summary.csv and summary.png into SWEEP_DIR; returns the table."""
    (sweep.folder / SUMMARY_CSV).write_text(summary_csv(statuses))
    (sweep.folder / SUMMARY_PNG).write_bytes(summary_png(statuses, sweep.folder.name))
    for status in statuses:
        if status.error:
            log.error("%s failed: %s (logs: %s)", status.trial.name, status.error, sweep.logs)
    log.info("wrote %s and %s", sweep.folder / SUMMARY_CSV, sweep.folder / SUMMARY_PNG)
    return format_table(statuses)


# --- running the trials ---


def to_run(statuses: list[TrialStatus]) -> list[Trial]:
    """The trials to submit now: neither finished nor under way (queued or running); says why for each."""
    todo = []
    for status in statuses:
        if status.state == FINISHED or status.state in UNDER_WAY:
            log.info("%s (%s): %s, left as it is", status.trial.name, " ".join(status.trial.overrides), status.state)
        else:
            todo.append(status.trial)
    return todo


def submit_slurm(sweep: Sweep, trials: list[Trial], args: argparse.Namespace) -> None:
    """Submit `trials` as one job array; each trial records its job in sweep.json."""
    executor = build_executor(args, sweep.logs)
    jobs = executor.submit_array([TrainingJob(sweep.config, sweep.run_overrides(trial)) for trial in trials])
    for trial, job in zip(trials, jobs):
        trial.jobs.append({"id": job.job_id, "where": "slurm"})
    sweep.save()
    log.info("submitted job array %s: %s", jobs[0].job_id.split("_")[0],
             ", ".join(f"{trial.name} as {job.job_id}" for trial, job in zip(trials, jobs)))
    log.info("logs: %s", sweep.logs)


def run_local(sweep: Sweep, trials: list[Trial], args: argparse.Namespace) -> None:
    """Run `trials` one after the other in local processes (a failure is logged; the next trial runs)."""
    executor = build_executor(args, sweep.logs)
    for trial in trials:
        job = executor.submit(TrainingJob(sweep.config, sweep.run_overrides(trial)))
        trial.jobs.append({"id": job.job_id, "where": "local"})
        sweep.save()
        log.info("%s (%s): local job %s, logs %s", trial.name, " ".join(trial.overrides), job.job_id, job.paths.stderr)
        try:
            job.result()
        except Exception as error:  # noqa: BLE001 - submitit wraps the trial's failure; the sweep goes on
            log.error("%s failed: %s", trial.name, str(error).strip().splitlines()[-1] if str(error).strip() else error)


def wait_for_trials(sweep: Sweep, poll_s: float) -> list[TrialStatus]:
    """Look at the trials every `poll_s` seconds until none is queued or running; log each change of state."""
    seen: dict[str, str] = {}
    while True:
        statuses = sweep_status(sweep)
        for status in statuses:
            if seen.get(status.trial.name) != status.state:
                log.info("%s: %s%s", status.trial.name, status.state,
                         "" if status.step is None else f" (step {status.step})")
                seen[status.trial.name] = status.state
        if not any(status.state in UNDER_WAY for status in statuses):
            return statuses
        time.sleep(poll_s)


# --- the command ---


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dist-kp sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--status", metavar="SWEEP_DIR",
                        help="print the trials' states and write summary.csv and summary.png; nothing is submitted")
    parser.add_argument("--config", help="YAML config of the trials, or a packaged config's name")
    parser.add_argument("--out", metavar="SWEEP_DIR", help="the sweep's local folder: sweep.json, one folder per trial")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2,...]",
                        help="a swept key and its values (YAML list); repeat it for more keys")
    parser.add_argument("--random", type=int, metavar="N", help="N points of the grid drawn at random (default: all)")
    parser.add_argument("--seed", type=int, help="seed of --random (default: the recorded one, else a new one)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--slurm", action="store_true", help="submit the trials to SLURM as one job array")
    where.add_argument("--local", action="store_true", help="run the trials one after the other in local processes")
    add_slurm_arguments(parser, job_name="dist_kp-sweep")
    parser.add_argument("--wait", action="store_true", help="with --slurm: wait for the trials to end, then summarize")
    parser.add_argument("--poll-s", type=float, default=30.0,
                        help="seconds between two looks at the trials while waiting (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value, for every trial")
    args = parser.parse_args(argv)
    if args.status is None:
        missing = [name for name, value in (("--config", args.config), ("--out", args.out)) if value is None]
        if not args.grid:
            missing.append("--grid")
        if not (args.slurm or args.local):
            missing.append("--slurm or --local")
        if missing:
            parser.error(f"a sweep needs {', '.join(missing)} (or --status SWEEP_DIR)")
        if args.seed is not None and args.random is None:
            parser.error("--seed chooses the points of --random N: give --random too, or drop --seed")
    return args


def sweep_folder(url: str) -> Path:
    if not is_local_url(url):
        raise SweepError(f"--out {url}: a sweep folder must be local (it holds sweep.json and submitit's logs, "
                         "which every node must see)")
    return Path(local_path(url)).resolve()


def seed_for(args: argparse.Namespace, folder: Path) -> int | None:
    """--seed, else the recorded one (the same command continues the same draw), else a new one."""
    if args.random is None or args.seed is not None:
        return args.seed
    if (folder / MANIFEST).exists():
        return Sweep.load(folder).seed
    return random.SystemRandom().randrange(2**31)


def show_status(folder: Path) -> int:
    sweep = Sweep.load(folder)
    print(write_summary(sweep, sweep_status(sweep)))
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    folder = sweep_folder(args.out)
    sweep = continue_or_start(plan(args.config, folder, parse_grid(args.grid), args.overrides, args.random,
                                   seed_for(args, folder)))
    trials = to_run(sweep_status(sweep))
    if trials and args.slurm:
        try:
            submit_slurm(sweep, trials, args)
        except Exception as error:  # noqa: BLE001 - sbatch's refusal comes as a generic submitit error
            text = str(error).strip()
            log.error("submission refused: %s", text.splitlines()[-1] if text else error)
            return 2
    elif trials:
        run_local(sweep, trials, args)
    else:
        log.info("no trial to start: each is finished, queued or running")
    if args.slurm and not args.wait:
        log.info("`dist-kp sweep --status %s` shows the trials' states", folder)
        return 0
    statuses = wait_for_trials(sweep, args.poll_s)
    print(write_summary(sweep, statuses))
    return 0 if all(status.state == FINISHED for status in statuses) else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        if args.status is not None:
            return show_status(sweep_folder(args.status))
        return run_sweep(args)
    except (SweepError, ConfigError, StorageError) as error:
        log.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(as_process(main))
