"""The Trainer and dist_kp's own hooks built in this process (as detectron2 tests its SimpleTrainer): no launcher."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from dist_kp import Hook
from dist_kp.config import ConfigError, EarlyStopConfig, load_config
from dist_kp.data.device_batches import DeviceBatches
from dist_kp.data.loaders import build_train_loader, train_index
from dist_kp.data.synthetic import generate
from dist_kp.engine.hooks import EARLY_STOP, BestWeightsHook, EarlyStopHook, EvaluationHook, user_hooks
from dist_kp.engine.schedule import build_optimizer, build_scheduler
from dist_kp.engine.trainer import Trainer
from dist_kp.evaluation.evaluator import EvalOutput
from dist_kp.model.execution import apply_execution_options
from dist_kp.model.keypoint_rcnn import build_model
from dist_kp.model.precision import grad_scaler
from dist_kp.storage import Storage
from dist_kp.storage.run_folder import RunFolder
from dist_kp.tracking.metrics_file import MetricsFile
from dist_kp.tracking.wandb_run import Tracker
from dist_kp.train import check_watched_metrics
from tests.conftest import TINY_CONFIG, tiny_overrides

CPU = torch.device("cpu")
STEPS_PER_EPOCH = 2  # 16 training images, 8 per step


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("small"), train=16, val=4, seed=1)


def build_trainer(root: Path, out: Path, *overrides: str) -> Trainer:
    """What train.run builds for one process, without the process group, the checkpoints and the tracking."""
    cfg = load_config(TINY_CONFIG, tiny_overrides(root, out, "train.workers=0", "train.batch_size=8", *overrides))
    store = Storage.from_config(cfg.storage)
    index = train_index(cfg, store)
    loader, sampler = build_train_loader(cfg, index, 0, 1, CPU, store)
    model = build_model(cfg.model, index.meta.num_keypoints, store)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, sampler.batches_per_epoch)
    apply_execution_options(model, cfg.train, CPU)
    return Trainer(cfg.train, model, optimizer, scheduler, grad_scaler(cfg.train.precision, CPU),
                   DeviceBatches(loader, CPU, cfg.data.prefetch), sampler, CPU, cfg.optim.clip_grad_norm)


class Recorder(Hook):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def before_train(self, trainer: Trainer) -> None:
        self.events.append(("before_train", trainer.progress.step))

    def after_step(self, trainer: Trainer) -> None:
        self.events.append(("after_step", trainer.progress.step))

    def after_epoch(self, trainer: Trainer) -> None:
        self.events.append(("after_epoch", trainer.progress.epoch))

    def after_evaluation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.events.append(("after_evaluation", trainer.progress.step, metrics["kp/AP"]))

    def after_train(self, trainer: Trainer) -> None:
        self.events.append(("after_train", trainer.progress.step, trainer.stop_reason))


class ScriptedEvaluator:
    """Stands in for the COCO evaluator (tested on its own): kp/AP follows a script, one value per evaluation."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)

    def run(self, model: torch.nn.Module, step: int, ema: bool = False) -> EvalOutput:
        return EvalOutput({"kp/AP": self.values.pop(0), "bbox/AP": 0.0}, [], "")


def test_a_trainer_built_in_process_trains_its_steps_and_calls_every_hook_in_order(small_root: Path,
                                                                                   tmp_path: Path) -> None:
    trainer = build_trainer(small_root, tmp_path / "run", "train.max_steps=3")
    recorder = Recorder()
    trainer.register(recorder)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert recorder.events == [("before_train", 0), ("after_step", 1), ("after_step", 2), ("after_epoch", 1),
                               ("after_step", 3), ("after_train", 3, None)]
    assert trainer.progress.to_dict() == {"epoch": 1, "batch": 1, "step": 3} and trainer.finished
    assert math.isfinite(trainer.log_record["train/loss"]) and trainer.log_record["step"] == 3
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_the_last_step_is_logged_and_recorded_when_max_steps_is_not_a_multiple_of_log_every(
    small_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    overrides = ("train.batch_size=2", "train.log_every=5")  # 8 steps per epoch
    trainer = build_trainer(small_root, out, *overrides, "train.max_steps=4")
    cfg = load_config(TINY_CONFIG, tiny_overrides(small_root, out, *overrides))
    trainer.register(Tracker(cfg, MetricsFile(RunFolder(str(out)))))
    with caplog.at_level(logging.INFO, "dist_kp.engine.trainer"):
        trainer.train()
    assert trainer.steps_per_epoch == 8
    assert [r["step"] for r in MetricsFile(RunFolder(str(out))).records] == [4]
    assert "epoch 0 [4/8] step 4 " in caplog.text  # the progress line of the smoke run's only logged step
    # Resumed on to step 7: step 5 is a logged step, then the new last one; no step twice.
    resumed = build_trainer(small_root, out, *overrides, "train.max_steps=7")
    resumed.progress.load_state_dict(trainer.progress.state_dict())
    resumed.register(Tracker(cfg, MetricsFile(RunFolder(str(out)))))
    resumed.train()
    assert [r["step"] for r in MetricsFile(RunFolder(str(out))).records] == [4, 5, 7]


def test_early_stop_stops_after_patience_evaluations_without_improvement_and_its_count_survives_resume(
    small_root: Path, tmp_path: Path
) -> None:
    cfg = EarlyStopConfig(metric="kp/AP", patience=2)
    trainer = build_trainer(small_root, tmp_path / "run", "train.epochs=10")
    early_stop, recorder = EarlyStopHook(cfg), Recorder()
    for hook in (EvaluationHook(trainer_eval_cfg(), ScriptedEvaluator([0.2, 0.5, 0.4, 0.5, 0.9])), early_stop,
                 recorder):
        trainer.register(hook)
    trainer.train()
    # 0.2, 0.5 (better), 0.4 (1 without), 0.5 (2 without: not better than 0.5, it ties): stop after epoch 4.
    assert trainer.stop_reason == EARLY_STOP and trainer.progress.step == 4 * STEPS_PER_EPOCH
    assert [e[2] for e in recorder.events if e[0] == "after_evaluation"] == [0.2, 0.5, 0.4, 0.5]
    assert recorder.events[-1] == ("after_train", 8, EARLY_STOP)
    # A resumed run gets the hook's state back: out of patience, it stops before its first step.
    resumed = build_trainer(small_root, tmp_path / "run2", "train.epochs=10")
    again = EarlyStopHook(cfg)
    again.load_state_dict(early_stop.state_dict())
    resumed.register(again)
    resumed.train()
    assert resumed.stop_reason == EARLY_STOP and resumed.progress.step == 0


def test_keep_best_writes_model_best_only_on_improvement_and_remembers_the_best_across_resume(
    small_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    folder = RunFolder(str(out))
    meta = {"keypoint_names": [], "skeleton": []}
    trainer = build_trainer(small_root, out, "train.epochs=3")
    best = BestWeightsHook(folder, "kp/AP", "max", trainer_model_cfg(), meta)
    trainer.register(EvaluationHook(trainer_eval_cfg(), ScriptedEvaluator([0.3, 0.6, 0.4])))
    trainer.register(best)
    trainer.train()
    saved = torch.load(out / "model_best.pt", weights_only=True)
    assert saved["best"] == {"metric": "kp/AP", "value": 0.6, "step": 2 * STEPS_PER_EPOCH}
    assert saved["model_config"]["backbone"] == "resnet18" and "model" in saved
    # Resumed with its state, a worse evaluation leaves model_best.pt alone; a better one replaces it.
    resumed = build_trainer(small_root, out, "train.epochs=2")
    again = BestWeightsHook(folder, "kp/AP", "max", trainer_model_cfg(), meta)
    again.load_state_dict(best.state_dict())
    resumed.register(EvaluationHook(trainer_eval_cfg(), ScriptedEvaluator([0.5, 0.7])))
    resumed.register(again)
    stamps = []

    class Watch(Hook):
        def after_evaluation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
            stamps.append(torch.load(out / "model_best.pt", weights_only=True)["best"])

    resumed.register(Watch())
    resumed.train()
    assert stamps == [{"metric": "kp/AP", "value": 0.6, "step": 4}, {"metric": "kp/AP", "value": 0.7, "step": 4}]


def trainer_eval_cfg():
    return load_config(TINY_CONFIG, ["eval.every_epochs=1"]).eval


def trainer_model_cfg():
    return load_config(TINY_CONFIG, []).model


@pytest.mark.parametrize("entry", ["os:path", "json:dumps", "pathlib:Path"])
def test_a_train_hooks_entry_that_is_not_a_hook_class_is_refused_naming_it(entry: str) -> None:
    cfg = load_config(TINY_CONFIG, [f"train.hooks=[{entry}]"])
    refused = rf"train.hooks: '{entry}' is not a hook class \(a subclass of dist_kp.Hook\)"
    with pytest.raises(ConfigError, match=refused):
        user_hooks(cfg)


def test_a_watched_metric_must_be_an_evaluation_metric_evaluated_every_few_epochs() -> None:
    with pytest.raises(ConfigError, match=r"checkpoint.keep_best: 'kp/APP' is not an evaluation metric; choose one of "
                                          r"kp/AP, kp/AP50"):
        check_watched_metrics(load_config(TINY_CONFIG, ["checkpoint.keep_best=kp/APP"]))
    with pytest.raises(ConfigError, match=r"train.early_stop.metric watches bbox/AP at every evaluation, but "
                                          r"eval.every_epochs=0"):
        check_watched_metrics(load_config(TINY_CONFIG, ["train.early_stop.metric=bbox/AP", "eval.every_epochs=0"]))
    check_watched_metrics(load_config(TINY_CONFIG, ["checkpoint.keep_best=bbox/AR100", "train.early_stop.patience=2"]))


@pytest.mark.parametrize(("epoch", "batch", "epochs", "max_steps", "past"), [
    (1, 1, 1, None, True),    # epochs lowered below the checkpoint's epoch
    (1, 0, 1, None, False),   # exactly at the end: the natural end of the run
    (0, 2, 1, None, False),   # the end of epoch 0 (batch = its length): not beyond epochs=1
    (0, 1, 5, 2, False),
    (1, 1, 5, 2, True),       # step 3 > max_steps 2
])
def test_past_end_is_true_only_beyond_the_lowered_end(small_root: Path, tmp_path: Path, epoch: int, batch: int,
                                                      epochs: int, max_steps: int | None, past: bool) -> None:
    overrides = [f"train.epochs={epochs}"] + ([f"train.max_steps={max_steps}"] if max_steps else [])
    trainer = build_trainer(small_root, tmp_path / "run", *overrides)
    trainer.progress.epoch, trainer.progress.batch = epoch, batch
    trainer.progress.step = epoch * STEPS_PER_EPOCH + batch
    assert trainer.past_end is past
