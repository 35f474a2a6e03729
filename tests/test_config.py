"""Config: YAML + dotted overrides, refused input names the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_kp.config import ConfigError, load_config
from tests.conftest import REPO, TINY_CONFIG, check, run_module, tiny_overrides, train_here


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_typo_key_is_refused_naming_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "optim.lrr" in str(error.value) and str(path) in str(error.value)
    assert "unknown key" in str(error.value)


def test_wrong_type_is_refused_naming_key(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  batch_size: two\n")
    with pytest.raises(ConfigError, match=r"train\.batch_size.*'two'"):
        load_config(path)


@pytest.mark.parametrize(
    "override, key",
    [("optim.lr=-0.1", "optim.lr"), ("train.batch_size=0", "train.batch_size"),
     ("schedule.milestones=[3,2]", "schedule.milestones"), ("schedule.milestones=[0,3]", "schedule.milestones")],
)
def test_impossible_values_are_refused(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(TINY_CONFIG, [override])
    source, *problems = str(error.value).splitlines()
    assert str(TINY_CONFIG) in source  # the first line names the file (and repeats the overrides)
    assert any(key in line for line in problems), problems  # the error itself names the key


def test_milestone_past_the_last_epoch_is_a_warning_and_the_run_trains(tmp_path: Path, synthetic_root: Path,
                                                                        capfd: pytest.CaptureFixture) -> None:
    # The tiny config's milestones are [8]: a two-epoch run needs no second override.
    result = check(train_here(["--config", str(TINY_CONFIG), *tiny_overrides(
        synthetic_root, tmp_path / "run", "train.epochs=2", "train.max_steps=2", "train.workers=0",
        "eval.every_epochs=0", "eval.at_end=false")], capfd))
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line and "schedule.milestones" in line]
    assert len(warnings) == 1 and "[8]" in warnings[0] and "train.epochs=2" in warnings[0], result.stderr[-3000:]
    assert "training finished at step 2" in result.stderr


def test_overrides_apply_on_top_of_the_file() -> None:
    cfg = load_config(TINY_CONFIG, ["optim.lr=0.005", "train.epochs=3", "schedule.milestones=[2]",
                                    "output_dir=s3://bucket/runs/x"])
    assert cfg.optim.lr == 0.005 and cfg.train.epochs == 3 and cfg.schedule.milestones == [2]
    assert cfg.output_dir == "s3://bucket/runs/x"
    assert cfg.model.backbone == "resnet18"  # untouched keys keep the file's value


def test_override_without_equals_is_refused() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(TINY_CONFIG, ["optim.lr"])


def test_written_config_loads_back_to_the_same_config(tmp_path: Path, synthetic_root: Path,
                                                       capfd: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    overrides = [f"data.root={synthetic_root}", f"output_dir={out}", "train.max_steps=1", "train.workers=0",
                 "eval.every_epochs=0", "eval.at_end=false", "optim.lr=0.0123"]
    check(train_here(["--config", str(TINY_CONFIG), *overrides], capfd))
    assert load_config(out / "config.yaml") == load_config(TINY_CONFIG, overrides)


def test_reference_recipe_is_valid_and_matches_the_published_schedule() -> None:
    cfg = load_config(REPO / "configs" / "coco_kp_r50_fpn.yaml")
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.02, 0.9, 1e-4)
    assert (cfg.train.epochs, cfg.schedule.milestones, cfg.schedule.gamma) == (46, [36, 43], 0.1)
    assert (cfg.schedule.warmup_iters, cfg.schedule.warmup_factor) == (1000, 0.001)
    assert cfg.train.batch_size == 2 and cfg.data.aspect_ratio_group_factor == 3 and cfg.data.hflip_prob == 0.5


def test_help_lists_the_config_sections() -> None:
    result = check(run_module("dist_kp.train", ["--help"]))
    for section in ("storage:", "data:", "model:", "optim:", "schedule:", "train:", "eval:", "checkpoint:",
                    "tracking:"):
        assert section in result.stdout
    assert "torchrun" in result.stdout


def test_bad_config_exits_with_a_message_not_a_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  epochz: 3\n")
    result = run_module("dist_kp.train", ["--config", str(path)])
    assert result.returncode == 2
    assert "train.epochz" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("override", [
    "storage.options.secret=abc",
    "storage.options.client_kwargs.aws_secret_access_key=abc",
])
def test_credentials_in_storage_options_are_refused_at_any_depth(override: str) -> None:
    with pytest.raises(ConfigError, match=r"storage\.options\..*credentials do not belong") as error:
        load_config(TINY_CONFIG, [override])
    assert "abc" not in str(error.value)


@pytest.mark.parametrize("override, old, new", [
    ("checkpoint.storage_options.region=eu-1", "checkpoint.storage_options", "storage.options"),
    ("checkpoint={timeout_s: 5}", "checkpoint.timeout_s", "storage.timeout_s"),
])
def test_storage_keys_of_the_checkpoint_section_are_refused_naming_the_new_key(override: str, old: str,
                                                                              new: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(TINY_CONFIG, [override])
    assert f"  {old}: moved to {new}" in str(error.value)


def test_storage_section_applies_options_and_timeout() -> None:
    cfg = load_config(TINY_CONFIG, ["storage.options.endpoint_url=http://127.0.0.1:9000", "storage.timeout_s=5"])
    assert cfg.storage.options == {"endpoint_url": "http://127.0.0.1:9000"} and cfg.storage.timeout_s == 5


@pytest.mark.parametrize("override", [
    "checkpoint.storage_options={client_kwargs: {aws_secret_access_key: Planted5ecret}}",
    "storage.options={client_kwargs: {aws_secret_access_key: Planted5ecret}}",
    "storage={options: {client_kwargs: {aws_secret_access_key: Planted5ecret}}}",
])
def test_credential_inside_a_section_valued_override_is_refused_without_echoing_it(override: str) -> None:
    with pytest.raises(ConfigError, match="aws_secret_access_key: credentials do not belong") as error:
        load_config(TINY_CONFIG, [override])
    assert "Planted5ecret" not in str(error.value)


def test_section_valued_override_is_merged_over_earlier_overrides() -> None:
    cfg = load_config(TINY_CONFIG, ["train.max_steps=2", "train={batch_size: 1}"])
    assert (cfg.train.max_steps, cfg.train.batch_size) == (2, 1)
    assert cfg.train.epochs == 10  # the file's keys of the section stay too
    cfg = load_config(TINY_CONFIG, ["train={batch_size: 1}", "train.max_steps=2"])
    assert (cfg.train.max_steps, cfg.train.batch_size) == (2, 1)


@pytest.mark.parametrize("overrides, key", [
    (["model.min_size=[0]"], "model.min_size"),
    (["model.min_size=[128, -4]"], "model.min_size"),
    (["model.min_size=[256]", "model.max_size=192"], "model.max_size"),
])
def test_resize_sizes_that_cannot_work_are_refused_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(TINY_CONFIG, overrides)
    assert f"  {key}" in str(error.value)


def test_override_with_invalid_yaml_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"train.max_steps=\[2.*not valid YAML"):
        load_config(TINY_CONFIG, ["train.max_steps=[2"])
