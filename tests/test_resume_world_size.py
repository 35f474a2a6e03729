"""A run requeued on other numbers of processes mid-epoch trains every sample of each epoch exactly once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from dist_kp.config import load_config
from dist_kp.data.coco import trainable_images
from dist_kp.storage import Storage
from dist_kp.data.loaders import train_index
from tests.conftest import TINY_CONFIG, check, child_env, run_module, tiny_overrides

# 48 training images, 4 per process per step: 6 steps per epoch on 2 processes, 4 on 3, 12 on 1.
EPOCHS = 3


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), *tiny_overrides(
        data, out, "train.workers=0", "eval.every_epochs=0", "eval.at_end=false", f"train.epochs={EPOCHS}",
        "train.hooks=[tests.hook_probe:SampleProbeHook]", "train.ema.decay=0.99", *extra)]


def steps_seen(probe: Path, world_size: int) -> list[list[tuple[int, int, list[int]]]]:
    """Per rank: (epoch, step, image ids) of every step, in order."""
    ranks = []
    for rank in range(world_size):
        lines = [line.split() for line in (probe / f"samples{rank}.log").read_text().splitlines()]
        ranks.append([(int(epoch), int(step), [int(i) for i in ids.split(",")]) for _, epoch, step, ids in lines])
    return ranks


def test_requeued_on_3_then_1_processes_mid_epoch_each_epoch_trains_the_dataset_exactly(
    synthetic_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = load_config(TINY_CONFIG, tiny_overrides(synthetic_root, out))
    index = train_index(cfg, Storage.from_config(cfg.storage))
    dataset = Counter(int(i) for i in index.image_ids[trainable_images(index, cfg.data.min_visible_keypoints)])
    assert len(dataset) == 48

    consumed: dict[int, Counter] = {epoch: Counter() for epoch in range(EPOCHS)}
    # 2 processes stop at step 3: epoch 0, 24 of 48 samples. 3 processes: 2 steps end epoch 0, step 6 is
    # epoch 1's first (12 samples). 1 process: 9 steps end epoch 1, 12 more train epoch 2.
    for nproc, max_steps, last_step in ((2, 3, 3), (3, 6, 6), (1, 100, 27)):
        probe = tmp_path / f"probe{nproc}"
        probe.mkdir()
        result = check(run_module("dist_kp.train", train_args(synthetic_root, out, f"train.max_steps={max_steps}"),
                                  nproc=nproc, env=child_env(PROBE_DIR=str(probe))))
        assert "EMAHook: it starts fresh" not in result.stderr
        ranks = steps_seen(probe, nproc)
        # DDP: every rank ran the same steps.
        assert len({tuple((epoch, step) for epoch, step, _ in steps) for steps in ranks}) == 1
        assert ranks[0][-1][1] == last_step
        for steps in ranks:
            for epoch, _, ids in steps:
                consumed[epoch].update(ids)
        if nproc == 3:
            assert ("resumed on 3 processes, checkpoint written by 2; continuing epoch 0 at sample 24 of 48 "
                    "(2 steps per process left in it") in result.stderr
        if nproc == 1:
            assert ("resumed on 1 process, checkpoint written by 3; continuing epoch 1 at sample 12 of 48 "
                    "(9 steps per process left in it") in result.stderr
    assert "training finished at step 27 (epoch 3)" in result.stderr
    # The EMA of the weights went on across the world sizes: restored at each start, one update per step.
    final = torch.load(out / "model_final.pt", weights_only=True)
    assert final["ema"] is True and final["ema_updates"] == 27
    for epoch in range(EPOCHS):
        # 48 = 2 x 4 x 3 + 3 x 4 x 2 (epoch 0) = 3 x 4 + 1 x 4 x 9 (epoch 1): no remainder to repeat.
        assert consumed[epoch] == dataset, (epoch, consumed[epoch] - dataset, dataset - consumed[epoch])
