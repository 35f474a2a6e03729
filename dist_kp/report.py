"""Plots and prediction pictures of a run, as PNG files, for people who do not use W&B.

usage:
  python -m dist_kp.report OUTPUT_DIR [--out DIR]

Reads the training records (OUTPUT_DIR/metrics.jsonl, on an object store its segments
metrics/part-<n>.jsonl) and OUTPUT_DIR/eval/<step>/metrics.json (a local path or any fsspec URL
such as s3://bucket/runs/exp1) and writes to DIR (default OUTPUT_DIR/report):
  losses.png       every loss term over the global step (each record, and its running mean)
  lr.png           the learning rate
  throughput.png   images/s, data-loading time and max memory
  ap.png           keypoint and box AP/AR at each evaluation
  predictions.png  ground truth next to predictions of the newest evaluation
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dist_kp import storage
from dist_kp.cli import as_process
from dist_kp.storage.run_folder import EVAL_METRICS, EVAL_PICTURES, RunFolder
from dist_kp.tracking.metrics_file import MetricsFile

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("dist_kp.report")

AP_KEYS = {"keypoints (OKS)": ["kp/AP", "kp/AP50", "kp/AP75", "kp/APm", "kp/APl", "kp/AR"],
           "boxes (IoU)": ["bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APm", "bbox/APl", "bbox/AR100"]}
THROUGHPUT_KEYS = [("images_per_s", "images / s"), ("data_time_s", "data-loading time (s)"),
                   ("max_memory_mb", "max CUDA memory (MiB)")]


class ReportError(ValueError):
    """An output_dir that holds nothing to report; the message names it."""


@dataclass
class RunHistory:
    """What a run wrote: training records, evaluation metrics by step, picture URLs by step."""

    output_dir: str
    records: list[dict[str, Any]]
    evaluations: dict[int, dict[str, float]] = field(default_factory=dict)
    pictures: dict[int, str] = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one key of the training records, in step order."""
        points = sorted((r["step"], r[key]) for r in self.records if key in r)
        return [s for s, _ in points], [v for _, v in points]

    def loss_terms(self) -> list[str]:
        """train/<term> keys, the total loss first."""
        keys = {k for r in self.records for k in r if k.startswith("train/") and not k.endswith("_smoothed")}
        return sorted(keys, key=lambda k: (k != "train/loss", k))


def _evaluation_metrics(folder: RunFolder, step: int) -> dict[str, float] | None:
    """eval/<step>/metrics.json without its step; None (with a warning) when it is not a metrics object."""
    url = folder.eval_file(step, EVAL_METRICS)
    try:
        metrics = json.loads(folder.read_bytes(url))
    except (ValueError, UnicodeDecodeError) as error:
        log.warning("%s is not JSON (%s); skipped", url, error)
        return None
    if not isinstance(metrics, dict):
        log.warning("%s holds a %s, not a metrics object; skipped", url, type(metrics).__name__)
        return None
    return {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}


def load_history(output_dir: str) -> RunHistory:
    """Read metrics.jsonl and every eval/<step>/metrics.json of a run (storage options from the environment)."""
    folder = RunFolder(output_dir)
    records = MetricsFile(folder).records
    evaluations, pictures = {}, {}
    for step in folder.eval_steps():
        if folder.exists(folder.eval_file(step, EVAL_METRICS)):
            metrics = _evaluation_metrics(folder, step)
            if metrics is not None:
                evaluations[step] = metrics
        if folder.exists(folder.eval_file(step, EVAL_PICTURES)):
            pictures[step] = folder.eval_file(step, EVAL_PICTURES)
    if not records and not evaluations:
        raise ReportError(f"{output_dir}: no metrics.jsonl records and no eval/<step>/metrics.json "
                          "(is this the output_dir of a training run?)")
    return RunHistory(output_dir, records, dict(sorted(evaluations.items())), dict(sorted(pictures.items())))


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # drawn without pyplot: no GUI backend, no global state

    return Figure(figsize=(width, height), layout="constrained")


def _grid(count: int, title: str) -> tuple[Figure, list[Any]]:
    columns = min(count, 3)
    rows = -(-count // columns)
    fig = _figure(4.2 * columns, 3.2 * rows + 0.4)
    fig.suptitle(title)
    axes = fig.subplots(rows, columns, squeeze=False).flatten().tolist()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def plot_losses(history: RunHistory) -> Figure | None:
    """One panel per loss term: each logged value, and the running mean the training log shows."""
    terms = history.loss_terms()
    if not terms:
        return None
    fig, axes = _grid(len(terms), f"training losses (all-reduced over ranks) — {history.output_dir}")
    for ax, key in zip(axes, terms):
        ax.plot(*history.series(key), color="tab:blue", alpha=0.35, linewidth=1, label="logged value")
        steps, smoothed = history.series(f"{key}_smoothed")
        if steps:
            ax.plot(steps, smoothed, color="tab:blue", linewidth=2, label="running mean")
        ax.set_title(key.removeprefix("train/"))
        ax.set_xlabel("global step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[0].legend()
    return fig


def plot_lr(history: RunHistory) -> Figure | None:
    steps, values = history.series("lr")
    if not steps:
        return None
    fig = _figure(6, 3.6)
    ax = fig.subplots()
    ax.plot(steps, values, color="tab:green")
    ax.set_title(f"learning rate — {history.output_dir}")
    ax.set_xlabel("global step")
    ax.set_ylabel("lr")
    ax.grid(alpha=0.3)
    return fig


def plot_throughput(history: RunHistory) -> Figure | None:
    # All zeros means not measured (max memory is CUDA's; CPU runs record 0).
    keys = [(k, label) for k, label in THROUGHPUT_KEYS if any(history.series(k)[1])]
    if not keys:
        return None
    fig, axes = _grid(len(keys), f"throughput — {history.output_dir}")
    for ax, (key, label) in zip(axes, keys):
        ax.plot(*history.series(key), color="tab:purple")
        ax.set_title(label)
        ax.set_xlabel("global step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    return fig


def plot_ap(history: RunHistory) -> Figure | None:
    """Keypoint and box AP/AR at each evaluation step."""
    if not history.evaluations:
        return None
    fig, axes = _grid(len(AP_KEYS), f"COCO evaluation — {history.output_dir}")
    steps = list(history.evaluations)
    for ax, (title, keys) in zip(axes, AP_KEYS.items()):
        for key in keys:
            values = [history.evaluations[s].get(key) for s in steps]
            points = [(s, v) for s, v in zip(steps, values) if v is not None]
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=key.split("/", 1)[1])
        ax.set_title(title)
        ax.set_xlabel("global step")
        ax.set_ylabel("AP / AR")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncol=2)
    return fig


def write_report(output_dir: str, out: str | None = None) -> list[str]:
    """Write the plots and the newest prediction pictures; returns the URLs written."""
    history = load_history(output_dir)
    folder = RunFolder(output_dir)
    out = (out or folder.report_folder()).rstrip("/")
    written = []
    plots = {"losses.png": plot_losses, "lr.png": plot_lr, "throughput.png": plot_throughput, "ap.png": plot_ap}
    for name, plot in plots.items():
        fig = plot(history)
        if fig is None:
            log.info("%s: nothing to plot in %s", name, output_dir)
            continue
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        folder.write(f"{out}/{name}", buffer.getvalue())
        written.append(f"{out}/{name}")
    if history.pictures:
        step, url = list(history.pictures.items())[-1]
        folder.write(f"{out}/{EVAL_PICTURES}", folder.read_bytes(url))
        written.append(f"{out}/{EVAL_PICTURES}")
        log.info("%s: ground truth (left) and predictions (right) at step %d", EVAL_PICTURES, step)
    steps, losses = history.series("train/loss")
    smoothed_steps, smoothed = history.series("train/loss_smoothed")
    if losses and smoothed:
        log.info("training loss: %.3f at step %d, %.3f (smoothed) at step %d", losses[0], steps[0], smoothed[-1],
                 smoothed_steps[-1])
    if history.evaluations:
        step, metrics = list(history.evaluations.items())[-1]
        log.info("newest evaluation, step %d: %s", step,
                 "  ".join(f"{k} {metrics[k]:.3f}" for k in ("kp/AP", "kp/AP50", "bbox/AP") if k in metrics))
    return written


def main(argv: list[str] | None = None) -> int:
    # Not distributed.setup_logging: that imports torch, which a report does not need.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="dist-kp report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="the run's output_dir (local path or fsspec URL)")
    parser.add_argument("--out", help="where the PNG files go (default: OUTPUT_DIR/report)")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.output_dir, args.out)
    except (ReportError, storage.StorageError) as error:
        log.error("%s", error)
        return 1
    for url in written:
        log.info("wrote %s", url)
    return 0


if __name__ == "__main__":
    sys.exit(as_process(main))
