"""Training-loop stall per checkpoint: background save vs synchronous save (issue 4).

    .venv/bin/python bench/bench_checkpoint.py [--repeats 3]

For the R50 Keypoint R-CNN (model + SGD momentum, ~ the reference recipe's state) and the
tiny CPU model, on local disk and on a SeaweedFS S3 server on 127.0.0.1, measures the time
the step loop is blocked: synchronous = snapshot + serialize + upload; background = what
`Checkpointer.save` blocks for (snapshot to CPU, then hand-off to the writer thread).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_kp import storage  # noqa: E402
from dist_kp.checkpoint import CheckpointStore, TrainState  # noqa: E402
from dist_kp.config import Config, load_config  # noqa: E402
from dist_kp.engine import TrainProgress, build_optimizer, build_scheduler  # noqa: E402
from dist_kp.model import build_model  # noqa: E402

log = logging.getLogger("bench_checkpoint")
REPO = Path(__file__).resolve().parents[1]


def train_state(cfg: Config) -> TrainState:
    model = build_model(cfg.model, 17)
    optimizer = build_optimizer(model, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the momentum buffers, as after the first real step
    scheduler = build_scheduler(optimizer, cfg, 100)
    return TrainState(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), TrainProgress(), cfg)


def measure(state: TrainState, output_dir: str, repeats: int) -> tuple[float, float, float]:
    store = CheckpointStore(output_dir, state.config.checkpoint)
    sync, background = [], []
    for i in range(repeats):
        state.progress.step = 2 * i + 1
        started = time.perf_counter()
        store.write(state.progress.step, state.capture())
        sync.append(time.perf_counter() - started)
        state.progress.step = 2 * i + 2
        started = time.perf_counter()
        store.save(state.progress.step, state.capture())
        background.append(time.perf_counter() - started)
        store.wait()
    size = store.fs.size(f"{store.path}/step_{state.progress.step:08d}/state.pt") / 2**20
    return statistics.median(sync), statistics.median(background), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    from tests.s3_server import start_server

    models = {
        "R50 (coco_kp_r50_fpn)": load_config(REPO / "configs/coco_kp_r50_fpn.yaml", ["model.backbone_weights=null",
                                                                                      "checkpoint.keep_last=2"]),
        "tiny (synthetic_cpu)": load_config(REPO / "configs/synthetic_cpu.yaml", ["checkpoint.keep_last=2"]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        server_dir = Path(tmp) / "s3"
        server_dir.mkdir()
        server = start_server(server_dir)
        try:
            os.environ.update(server.env())
            server.create_bucket("bench")
            storage.configure({}, 60.0)
            log.info("| model | storage | checkpoint MB | synchronous stall s | background stall s | ratio |")
            log.info("|---|---|---|---|---|---|")
            for name, cfg in models.items():
                state = train_state(cfg)
                for where, out in (("local disk", f"{tmp}/local/{name[:4]}"), ("S3 (SeaweedFS)", f"s3://bench/{name[:4]}")):
                    sync, background, size = measure(state, out, args.repeats)
                    log.info("| %s | %s | %.0f | %.3f | %.3f | %.1f%% |", name, where, size, sync, background,
                             100 * background / sync)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
