"""train.precision: bf16 autocast on the CPU in training and evaluation; fp16 refused off CUDA; train.amp moved."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from dist_kp.config import ConfigError, load_config
from dist_kp.engine.hooks import Hook
from dist_kp.model.keypoint_rcnn import unwrap
from dist_kp.model.precision import autocast, grad_scaler
from tests.conftest import TINY_CONFIG, check, child_env, run_module, tiny_overrides


class DtypeProbe(Hook):
    """Writes PROBE_DIR/dtypes.json: the dtype of the first convolution's output, in training and in evaluation."""

    def __init__(self, cfg) -> None:
        self.path = Path(os.environ["PROBE_DIR"]) / "dtypes.json"
        self.seen: dict[str, list[str]] = {"train": [], "eval": []}

    def before_train(self, trainer) -> None:
        def note(module, inputs, output) -> None:
            mode = "train" if module.training else "eval"
            self.seen[mode] = sorted({*self.seen[mode], str(output.dtype)})

        unwrap(trainer.model).backbone.body.conv1.register_forward_hook(note)

    def after_train(self, trainer) -> None:
        self.path.write_text(json.dumps(self.seen))


def test_bf16_trains_and_evaluates_under_cpu_autocast_with_finite_losses(tmp_path: Path, synthetic_root: Path) -> None:
    out = tmp_path / "run"
    result = check(run_module("dist_kp.train", ["--config", str(TINY_CONFIG), *tiny_overrides(
        synthetic_root, out, "train.max_steps=3", "train.workers=0", "train.precision=bf16", "eval.every_epochs=0",
        "eval.max_images=2", "eval.num_visualize=0", f"train.hooks=[{__name__}:DtypeProbe]")],
        env=child_env(PROBE_DIR=str(tmp_path))))
    assert "precision bf16 (autocast to torch.bfloat16 on cpu, no GradScaler)" in result.stderr
    # Autocast really ran: convolutions computed in bf16 in both loops.
    assert json.loads((tmp_path / "dtypes.json").read_text()) == {"train": ["torch.bfloat16"],
                                                                  "eval": ["torch.bfloat16"]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(v) for r in records for k, v in r.items() if k.startswith("train/"))
    assert (out / "eval" / "00000003" / "metrics.json").is_file()


def test_autocast_computes_in_the_precision_dtype_and_fp32_not_at_all() -> None:
    cpu = torch.device("cpu")
    a = torch.ones(4, 4)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with autocast(precision, cpu):
            assert (a @ a).dtype == dtype
    assert not grad_scaler("bf16", cpu).is_enabled() and not grad_scaler("fp32", cpu).is_enabled()


def test_fp16_on_the_cpu_is_refused_naming_the_key_and_the_alternative() -> None:
    for call in (lambda: grad_scaler("fp16", torch.device("cpu")), lambda: autocast("fp16", torch.device("cpu")).__enter__()):
        with pytest.raises(ConfigError, match=r"train\.precision=fp16 needs a CUDA device.*bf16"):
            call()


def test_old_amp_key_is_refused_naming_train_precision() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(TINY_CONFIG, ["train.amp=true"])
    assert "  train.amp: moved to train.precision" in str(error.value)
