"""train.ema: the EMA of the weights, what uses it (evaluation, model_final.pt) and how it resumes; in this process."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from dist_kp import Hook
from dist_kp.config import EMAConfig, load_config
from dist_kp.data.loaders import val_index
from dist_kp.data.synthetic import generate
from dist_kp.engine.hooks import EMAHook, EvaluationHook, FinalWeightsHook
from dist_kp.engine.run_state import RunState
from dist_kp.engine.trainer import Trainer
from dist_kp.evaluation.evaluator import Evaluator
from dist_kp.model.ema import ModelEMA, ema_decay
from dist_kp.model.errors import WeightsError
from dist_kp.model.keypoint_rcnn import build_model, read_weights_file
from dist_kp.model.trained import trained_model
from dist_kp.storage import Storage
from dist_kp.storage.run_folder import RunFolder
from tests.conftest import TINY_CONFIG, tiny_overrides
from tests.test_trainer import CPU, build_trainer

EMA_HOOK_STATE = "hook:dist_kp.engine.hooks.EMAHook"


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("small"), train=16, val=4, seed=1)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(load_config(TINY_CONFIG, []).model, 17)


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_the_decay_ramps_up_over_warmup_steps_and_is_constant_without_warmup() -> None:
    cfg = EMAConfig(decay=0.999, warmup_steps=100)
    assert ema_decay(cfg, 1) == pytest.approx(0.999 * (1 - math.exp(-0.01)))
    assert ema_decay(cfg, 100) == pytest.approx(0.999 * (1 - math.exp(-1)))
    assert ema_decay(cfg, 10_000) == pytest.approx(0.999)
    assert [ema_decay(EMAConfig(decay=0.9, warmup_steps=0), n) for n in (1, 50)] == [0.9, 0.9]


def test_an_update_lerps_each_trained_parameter_by_the_decay_and_shares_buffers_and_frozen_parameters() -> None:
    model = tiny_model()
    model.backbone.body.conv1.weight.requires_grad_(False)
    ema = ModelEMA(model, EMAConfig(decay=0.75, warmup_steps=0))
    start = trained_state(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    averaged = dict(ema.module.named_parameters())
    for name, before in start.items():
        # d * ema + (1 - d) * weights, bit for bit what one lerp by 1 - d gives
        assert torch.equal(averaged[name], torch.lerp(before, before + 1.0, 0.25)), name
        assert averaged[name].dtype == torch.float32 and not averaged[name].requires_grad
    assert "backbone.body.conv1.weight" not in ema.names
    assert averaged["backbone.body.conv1.weight"] is model.backbone.body.conv1.weight
    live_buffers = dict(model.named_buffers())
    assert all(buffer is live_buffers[name] for name, buffer in ema.module.named_buffers())
    assert ema.updates == 1 and ema.decay == 0.75 and not ema.module.training


def test_the_state_of_an_average_restores_it_exactly_and_a_mismatched_one_is_refused_by_name() -> None:
    model = tiny_model()
    cfg = EMAConfig(decay=0.99, warmup_steps=10)
    ema = ModelEMA(model, cfg)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01)
        ema.update()
    again = ModelEMA(model, cfg)
    again.load_state_dict(ema.state_dict())
    ema.update()
    again.update()
    assert again.updates == ema.updates == 4
    for a, b in zip(ema.state_dict()["parameters"].values(), again.state_dict()["parameters"].values()):
        assert torch.equal(a, b)
    state = ema.state_dict()
    state["parameters"] = {k: v for k, v in state["parameters"].items() if "rpn" not in k}
    with pytest.raises(WeightsError, match=r"missing \['rpn.head"):
        again.load_state_dict(state)


def test_with_ema_on_the_evaluation_and_model_final_pt_use_the_ema_weights_which_differ_from_the_trained_ones(
        small_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    out.mkdir()
    overrides = ("train.max_steps=3", "train.ema.decay=0.9", "train.ema.warmup_steps=0")
    trainer = build_trainer(small_root, out, *overrides)
    cfg = load_config(TINY_CONFIG, tiny_overrides(small_root, out, "train.workers=0", "train.batch_size=8",
                                                  *overrides))
    folder = RunFolder(str(out))
    index = val_index(cfg, Storage.from_config(cfg.storage))
    evaluator = Evaluator(cfg, index, folder, CPU)
    ema = ModelEMA(trainer.model, cfg.train.ema)
    meta = index.meta.to_dict()
    for hook in (EMAHook(ema), EvaluationHook(cfg.eval, evaluator, ema),
                 FinalWeightsHook(folder, cfg.model, meta, ema)):
        trainer.register(hook)
    with caplog.at_level(logging.INFO):
        trainer.train()
    assert trainer.progress.step == 3 and ema.updates == 3

    final = torch.load(out / "model_final.pt", weights_only=True)
    assert (final["ema"], final["ema_decay"], final["ema_warmup_steps"], final["ema_updates"]) == (True, 0.9, 0, 3)
    raw = trainer.model.state_dict()
    averaged = ema.module.state_dict()
    assert all(torch.equal(final["model"][name], averaged[name]) for name in raw)
    differ = [name for name in ema.names if not torch.equal(final["model"][name], raw[name])]
    assert len(differ) > len(ema.names) // 2, differ  # every parameter that trained
    buffers = [name for name, _ in trainer.model.named_buffers()]
    assert buffers and all(torch.equal(final["model"][name], raw[name]) for name in buffers)
    assert f"final weights written to {out}/model_final.pt: EMA weights (decay 0.9, warmup 0 steps, 3 updates)" \
        in caplog.text

    metrics = json.loads((out / "eval" / f"{3:08d}" / "metrics.json").read_text())
    assert metrics["weights"] == "ema" and "kp/AP" in metrics
    assert "evaluation at step 3 (EMA weights, 4 images" in caplog.text
    # The evaluation at the end evaluated exactly those weights (what predict/evaluate rebuild from model_final.pt).
    from_file = trained_model(read_weights_file(str(out / "model_final.pt"))).model
    assert trainer.evaluation.results == evaluator.run(from_file, 4).results
    assert trainer.evaluation.results != evaluator.run(trainer.model, 5).results


class AverageAtStart(Hook):
    """Records the average's trained parameters when training (re)starts, after the EMA hook's before_train."""

    def __init__(self, ema: ModelEMA) -> None:
        self.ema = ema
        self.seen: dict[str, torch.Tensor] = {}

    def before_train(self, trainer: Trainer) -> None:
        self.seen = {name: p.detach().clone() for name, p in self.ema.module.named_parameters()
                     if name in self.ema.names}


def run_state_of(trainer: Trainer, out: Path, *hooks: Hook, overrides: tuple[str, ...] = ()) -> RunState:
    cfg = load_config(TINY_CONFIG, tiny_overrides(out, out, *overrides))
    state = RunState(cfg, {})
    state.register("model", trainer.model)
    state.register("progress", trainer.progress)
    for hook in hooks:
        state.register_hook(hook)
    return state


def test_a_checkpoint_without_an_ema_resumed_with_ema_on_starts_the_average_from_the_resumed_weights(
        small_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    without = build_trainer(small_root, tmp_path / "a", "train.max_steps=2")
    without.train()
    snapshot = run_state_of(without, tmp_path).capture()
    resumed_weights = trained_state(without.model)

    trainer = build_trainer(small_root, tmp_path / "b", "train.max_steps=3", "train.ema.decay=0.9")
    ema = ModelEMA(trainer.model, EMAConfig(decay=0.9))
    probe = AverageAtStart(ema)
    hook = EMAHook(ema)
    with caplog.at_level(logging.INFO):
        run_state_of(trainer, tmp_path, hook, overrides=("train.ema.decay=0.9",)).restore(snapshot, "step_2")
        trainer.register(hook)
        trainer.register(probe)
        trainer.train()
    assert "step_2 holds no state of dist_kp.engine.hooks.EMAHook: it starts fresh" in caplog.text
    assert ("the checkpoint resumed from holds no EMA of the weights (written with train.ema off): the average "
            "starts from the weights of step 2") in caplog.text
    assert all(torch.equal(probe.seen[name], resumed_weights[name]) for name in ema.names)
    assert ema.updates == 1


def test_a_checkpoint_with_an_ema_resumed_with_ema_off_is_resumed_and_its_average_ignored_with_a_log_line(
        small_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trainer = build_trainer(small_root, tmp_path / "a", "train.max_steps=1")
    ema = ModelEMA(trainer.model, EMAConfig())
    trainer.register(EMAHook(ema))
    trainer.train()
    snapshot = run_state_of(trainer, tmp_path, EMAHook(ema), overrides=("train.ema.decay=0.9998",)).capture()
    assert snapshot[EMA_HOOK_STATE]["updates"] == 1

    plain = build_trainer(small_root, tmp_path / "b", "train.max_steps=2")
    with caplog.at_level(logging.INFO):
        run_state_of(plain, tmp_path).restore(snapshot, "step_1")
    assert plain.progress.step == 1
    assert "config changed since step_1: train.ema" in caplog.text
    assert ("step_1 holds the state of dist_kp.engine.hooks.EMAHook, a hook this run does not have (train.ema off, "
            "or no longer in train.hooks): ignored") in caplog.text
