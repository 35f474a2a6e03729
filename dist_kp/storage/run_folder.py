"""Every path under OUTPUT_DIR, in one place: writers and readers find files through `RunFolder`.

    OUTPUT_DIR/
      lease.json                   the run that holds the folder: host, pid, job, heartbeat (lease, rank 0)
      config.yaml                  the resolved config (train, at every start that passed the resume checks)
      metrics.jsonl                one record per logged step (tracking, rank 0), on a local disk
      metrics/part-<n>.jsonl       the same records on an object store, in segments written once (MetricsFile)
      tracking.json                the W&B run id of this output_dir (tracking)
      checkpoints/step_<step>/     state.pt, manifest.json (the manifest last: CheckpointStore)
      eval/<step>/                 results.json, metrics.json, predictions.png (evaluation, tracking)
      model_final.pt               weights and what inference needs (train, at the end)
      model_best.pt                the same, of the best evaluation so far (checkpoint.keep_best)
      report/                      PNG plots: losses, lr, throughput, ap, predictions (report)
      tensorboard/                 TensorBoard event files, events.out.tfevents.* (tracking.tensorboard, rank 0)
      submitit/                    submitit's logs and pickles of `dist-kp submit` (SLURM: one folder per job)

Every write goes through the storage's whole-or-nothing writer, except metrics.jsonl on a local
disk, which is appended line by line (a cut last line is dropped when it is read).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from dist_kp.storage import TEMP_MARK, Storage, is_local_url, local_path

LEASE = "lease.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
METRICS_SEGMENTS = "metrics"
TRACKING = "tracking.json"
MODEL_FINAL = "model_final.pt"
MODEL_BEST = "model_best.pt"
CHECKPOINTS = "checkpoints"
EVAL = "eval"
REPORT = "report"
TENSORBOARD = "tensorboard"
SUBMITIT = "submitit"

CHECKPOINT_STATE = "state.pt"
CHECKPOINT_MANIFEST = "manifest.json"
EVAL_RESULTS = "results.json"
EVAL_METRICS = "metrics.json"
EVAL_PICTURES = "predictions.png"

log = logging.getLogger(__name__)

# storage.temp_path: `<file>.tmp-<pid>`, in the folder of the file it becomes.
_TEMP_NAME = re.compile(rf"(.+){re.escape(TEMP_MARK)}(\d+)")
_CHECKPOINT_NAME = re.compile(r"step_(\d{8,})")
_EVAL_NAME = re.compile(r"\d{8,}")
_METRICS_SEGMENT_NAME = re.compile(r"part-(\d{6,})\.jsonl")
# Every relative path the run folder may hold; the regular expressions are anchored.
_KNOWN = [
    re.escape(LEASE), re.escape(CONFIG), re.escape(METRICS), re.escape(TRACKING), re.escape(MODEL_FINAL), re.escape(MODEL_BEST),
    rf"{METRICS_SEGMENTS}/{_METRICS_SEGMENT_NAME.pattern}",
    rf"{CHECKPOINTS}/{_CHECKPOINT_NAME.pattern}/({re.escape(CHECKPOINT_STATE)}|{re.escape(CHECKPOINT_MANIFEST)})",
    rf"{EVAL}/{_EVAL_NAME.pattern}/({'|'.join(map(re.escape, (EVAL_RESULTS, EVAL_METRICS, EVAL_PICTURES)))})",
    rf"{REPORT}/[a-z_]+\.png",  # the plots of dist_kp.report, and the newest predictions.png
    rf"{TENSORBOARD}/events\.out\.tfevents\.[^/]+",  # one file per writer: <time>.<host>.<pid>.<n>
    rf"{SUBMITIT}/(\d+/)?[^/]+",  # submitit names them: <job>_submitted.pkl, <job>_<task>_log.out, ...
]


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder name (`step_00001200` -> 1200), None for anything else."""
    match = _CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def metrics_segment_name(number: int) -> str:
    return f"part-{number:06d}.jsonl"


def metrics_segment_number(name: str) -> int | None:
    """The number of a metrics segment name (`part-000012.jsonl` -> 12), None for anything else."""
    match = _METRICS_SEGMENT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def eval_step(name: str) -> int | None:
    """The step of an evaluation folder name (`00001200` -> 1200), None for anything else."""
    return int(name) if _EVAL_NAME.fullmatch(name) else None


def names_a_run_file(relative: str) -> bool:
    """True when `relative` (a path under OUTPUT_DIR, '/'-separated) is a file this module names.

    A temporary file of an unfinished local write (`*.tmp-PID`) is not.
    """
    return TEMP_MARK not in relative and any(re.fullmatch(pattern, relative) for pattern in _KNOWN)


# The folders dist_kp writes files into through storage.write_file (glob patterns under OUTPUT_DIR).
_WRITTEN_FOLDERS = ("", f"{METRICS_SEGMENTS}/", f"{CHECKPOINTS}/*/", f"{EVAL}/*/", f"{REPORT}/", f"{TENSORBOARD}/")
# Paths named in full in one log line; more are counted.
SHOWN_PATHS = 5


def some_of(paths: list[str]) -> str:
    """`paths` for one log line: the first few by name, then how many more."""
    more = len(paths) - SHOWN_PATHS
    return ", ".join(paths[:SHOWN_PATHS]) + (f" and {more} more" if more > 0 else "")


def process_alive(pid: int) -> bool:
    """True while a process `pid` exists on this machine (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _base(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


class RunFolder:
    """OUTPUT_DIR of one run (a local path or fsspec URL) and the storage that reaches it."""

    def __init__(self, output_dir: str, storage: Storage | None = None) -> None:
        self.url = output_dir.rstrip("/") or "/"
        self.storage = storage or Storage()

    def __repr__(self) -> str:
        return f"RunFolder({self.url!r})"

    def join(self, *parts: str) -> str:
        return "/".join([self.url, *parts])

    @property
    def lease(self) -> str:
        return self.join(LEASE)

    @property
    def config(self) -> str:
        return self.join(CONFIG)

    @property
    def metrics(self) -> str:
        return self.join(METRICS)

    @property
    def metrics_segments(self) -> str:
        return self.join(METRICS_SEGMENTS)

    def metrics_segment(self, number: int) -> str:
        return self.join(METRICS_SEGMENTS, metrics_segment_name(number))

    def metrics_segment_numbers(self) -> list[int]:
        """Numbers of the stored metrics segments, oldest first."""
        return self._listed_steps(self.metrics_segments, metrics_segment_number)

    @property
    def tracking(self) -> str:
        return self.join(TRACKING)

    @property
    def model_final(self) -> str:
        return self.join(MODEL_FINAL)

    @property
    def model_best(self) -> str:
        return self.join(MODEL_BEST)

    @property
    def checkpoints(self) -> str:
        return self.join(CHECKPOINTS)

    def checkpoint(self, step: int) -> str:
        return self.join(CHECKPOINTS, checkpoint_name(step))

    def eval_folder(self, step: int) -> str:
        return self.join(EVAL, f"{step:08d}")

    def eval_file(self, step: int, name: str) -> str:
        return f"{self.eval_folder(step)}/{name}"

    def report_folder(self) -> str:
        return self.join(REPORT)

    @property
    def tensorboard(self) -> str:
        return self.join(TENSORBOARD)

    @property
    def submitit(self) -> str:
        return self.join(SUBMITIT)

    def write(self, url: str, data: bytes | memoryview) -> None:
        """Store a file of this run whole or not at all (errors name the URL)."""
        self.storage.write(url, data)

    def exists(self, url: str) -> bool:
        with self.storage.named_errors(url):
            fs, path = self.storage.url_to_fs(url)
            return fs.exists(path)

    def read_bytes(self, url: str) -> bytes:
        with self.storage.named_errors(url):
            fs, path = self.storage.url_to_fs(url)
            return fs.cat_file(path)

    def names(self, folder: str) -> list[str]:
        """Names of the files and folders in `folder` (a URL), sorted; none when it does not exist."""
        with self.storage.named_errors(folder):
            fs, path = self.storage.url_to_fs(folder)
            fs.invalidate_cache(path)  # another writer (or this process, through another client) changed it
            if not fs.exists(path):
                return []
            # An object store may list the folder's own entry (`key/`) in it.
            return sorted(_base(p) for p in fs.ls(path, detail=False) if p.rstrip("/") != path.rstrip("/"))

    def _listed_steps(self, folder: str, parse) -> list[int]:
        return sorted(step for step in map(parse, self.names(folder)) if step is not None)

    def checkpoint_steps(self) -> list[int]:
        """Steps that have a checkpoint folder (complete or not), oldest first."""
        return self._listed_steps(self.checkpoints, checkpoint_step)

    def eval_steps(self) -> list[int]:
        """Steps that have an evaluation folder, oldest first."""
        return self._listed_steps(self.join(EVAL), eval_step)

    def remove_stale_temporaries(self) -> list[str]:
        """Delete the temporaries of dist_kp's local writes whose process is gone (killed mid-write); rank 0, at start.

        Only `<a file this module names>.tmp-<pid>` in a folder dist_kp writes, so nothing a user
        keeps under OUTPUT_DIR is touched. The name does not say which host wrote it: one whose pid
        runs on this host may still be written and is left (named in a warning). Object stores
        have none: an unfinished upload is not an object (CheckpointStore aborts those).
        """
        if not is_local_url(self.url):
            return []
        root = Path(local_path(self.url))
        removed, left = [], []
        for path in sorted(p for folder in _WRITTEN_FOLDERS for p in root.glob(f"{folder}*{TEMP_MARK}*")):
            match = _TEMP_NAME.fullmatch(path.relative_to(root).as_posix())
            if not (match and names_a_run_file(match.group(1)) and path.is_file()):
                continue
            if process_alive(int(match.group(2))):
                left.append(str(path))
            else:
                path.unlink()
                removed.append(str(path))
        if removed:
            log.info("removed %d temporary files left by a killed write under %s: %s", len(removed), self.url,
                     some_of(removed))
        if left:
            log.warning("left %d temporary files under %s: their process id runs on this host, so a write may "
                        "still be going on: %s", len(left), self.url, some_of(left))
        return removed
