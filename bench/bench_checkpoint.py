"""Training-loop stall per checkpoint: background save vs synchronous save (issue 4).

    .venv/bin/python bench/bench_checkpoint.py [--repeats 3] [--step-ms 200]

For the R50 Keypoint R-CNN (model + SGD momentum, ~ the reference recipe's state) and the
tiny CPU model, on local disk and on a SeaweedFS S3 server on 127.0.0.1, measures how long
the step loop is held up by one checkpoint:

- synchronous: snapshot + serialize + sha256 + upload, the loop waits for all of it;
- background, blocked: what `CheckpointHook.save` blocks for (gather RNG, copy to CPU, hand-off);
- background, stall: blocked + the extra time the steps take while the writer thread runs
  (steps are a fixed single-thread matmul workload of --step-ms; the difference to the same
  steps without a save in flight is CPU/GIL contention from the writer).

The ratio is stall / synchronous; the goal is < 10%. On a machine with few cores (and the S3
server on the same cores) the contention part is larger than on a training node.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_kp.config import Config, load_config  # noqa: E402
from dist_kp.engine.checkpoint import CheckpointStore  # noqa: E402
from dist_kp.engine.run_state import RunState  # noqa: E402
from dist_kp.engine.schedule import build_optimizer, build_scheduler  # noqa: E402
from dist_kp.engine.trainer import TrainProgress  # noqa: E402
from dist_kp.model.keypoint_rcnn import build_model  # noqa: E402
from dist_kp.storage.run_folder import RunFolder  # noqa: E402

log = logging.getLogger("bench_checkpoint")
REPO = Path(__file__).resolve().parents[1]


def train_state(cfg: Config) -> tuple[RunState, TrainProgress]:
    model = build_model(cfg.model, 17)
    optimizer = build_optimizer(model, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the momentum buffers, as after the first real step
    scheduler = build_scheduler(optimizer, cfg, 100)
    state, progress = RunState(cfg), TrainProgress()
    for name, part in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler),
                       ("scaler", torch.amp.GradScaler("cpu", enabled=False)), ("progress", progress)):
        state.register(name, part)
    return state, progress


def make_step(step_ms: float) -> Callable[[], None]:
    """A fixed compute step of about `step_ms` (matmuls, GIL released)."""
    a = torch.randn(256, 256)
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    per_matmul = (time.perf_counter() - t0) / 20
    count = max(1, round(step_ms / 1000 / per_matmul))

    def step() -> None:
        for _ in range(count):
            a @ a

    return step


def step_time(step: Callable[[], None], count: int = 5) -> float:
    """Median duration of `step` now (the machine's load changes: calibrate next to each save)."""
    durations = []
    for _ in range(count):
        t0 = time.perf_counter()
        step()
        durations.append(time.perf_counter() - t0)
    return statistics.median(durations)


def measure(state: RunState, progress: TrainProgress, output_dir: str, repeats: int,
            step: Callable[[], None]) -> dict[str, float]:
    store = CheckpointStore(RunFolder(output_dir), state.config.checkpoint)
    sync, blocked, stall = [], [], []
    for i in range(repeats):
        progress.step = 2 * i + 1
        started = time.perf_counter()
        store.write(progress.step, state.capture())
        sync.append(time.perf_counter() - started)

        progress.step = 2 * i + 2
        step_s = step_time(step)
        started = time.perf_counter()
        store.save(progress.step, state.capture())
        handoff = time.perf_counter() - started
        steps, loop_started = 0, time.perf_counter()
        while store.in_flight:
            step()
            steps += 1
        overlapped = time.perf_counter() - loop_started
        store.wait()
        blocked.append(handoff)
        stall.append(handoff + max(0.0, overlapped - steps * step_s))
    size = store.fs.size(f"{store._step_path(progress.step)}/state.pt") / 2**20
    return {"size_mb": size, "sync": statistics.median(sync), "blocked": statistics.median(blocked),
            "stall": statistics.median(stall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=200.0, help="duration of one simulated training step")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(1)
    from tests.s3_server import start_server

    models = {
        "R50 (coco_kp_r50_fpn)": load_config(REPO / "configs/coco_kp_r50_fpn.yaml", ["model.backbone_weights=null",
                                                                                      "checkpoint.keep_last=2"]),
        "tiny (synthetic_cpu)": load_config(REPO / "configs/synthetic_cpu.yaml", ["checkpoint.keep_last=2"]),
    }
    step = make_step(args.step_ms)
    log.info("simulated step %.0f ms, %d CPU cores, %d repeats (median shown)", 1000 * step_time(step, 10),
             os.cpu_count(), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        server_dir = Path(tmp) / "s3"
        server_dir.mkdir()
        server = start_server(server_dir)
        try:
            os.environ.update(server.env())
            server.create_bucket("bench")
            log.info("| model | storage | checkpoint MB | synchronous save s | background: blocked s | "
                     "background: stall s | stall / synchronous |")
            log.info("|---|---|---|---|---|---|---|")
            for name, cfg in models.items():
                state, progress = train_state(cfg)
                for where, out in (("local disk", f"{tmp}/local/{name[:4]}"),
                                   ("S3 (SeaweedFS, loopback)", f"s3://bench/{name[:4]}")):
                    r = measure(state, progress, out, args.repeats, step)
                    log.info("| %s | %s | %.1f | %.3f | %.3f | %.3f | %.1f%% |", name, where, r["size_mb"], r["sync"],
                             r["blocked"], r["stall"], 100 * r["stall"] / r["sync"])
        finally:
            server.stop()


if __name__ == "__main__":
    main()
