"""What the shipped configs give a newcomer: no wait for W&B on an offline node, one rule for other batch sizes,
loader workers that fit the CPUs the SLURM scripts ask per GPU."""

from __future__ import annotations

import re

import pytest
import yaml

from dist_kp import submit
from dist_kp.config import load_config
from dist_kp.config.packaged import CONFIG_DIR, packaged_config_names
from dist_kp.engine.schedule import batch_scaling
from tests.conftest import REPO


@pytest.mark.parametrize("name", packaged_config_names())
def test_no_packaged_config_streams_to_wandb_unless_told_and_the_coco_one_says_how(name: str) -> None:
    # online on a node without internet waits wandb.init's 90 s timeout before training starts
    assert load_config(name).tracking.mode != "online"
    if name == "coco_kp_r50_fpn":
        text = (CONFIG_DIR / f"{name}.yaml").read_text()
        assert yaml.safe_load(text)["tracking"]["mode"] == "offline"
        assert "tracking.mode=online" in text and "WANDB_API_KEY" in text


def test_the_scaling_rule_keeps_the_recipes_lr_per_image_and_warmup_images_and_the_docs_give_its_examples() -> None:
    recipe = batch_scaling(load_config("coco_kp_r50_fpn"), world_size=8)
    assert recipe.startswith("total batch 16 (8 processes x 2 images): optim.lr 0.02 = 0.00125 per image, "
                             "schedule.warmup_iters 1000 = 16,000 images")
    readme = " ".join((REPO / "README.md").read_text().split())
    config = (CONFIG_DIR / "coco_kp_r50_fpn.yaml").read_text()
    examples = {8: ("optim.lr=0.01", "schedule.warmup_iters=2000"), 64: ("optim.lr=0.08", "schedule.warmup_iters=250")}
    for batch, overrides in examples.items():
        assert " ".join(overrides) in readme and re.search(rf"{' '.join(overrides)}\b", " ".join(config.split()))
        scaled = batch_scaling(load_config("coco_kp_r50_fpn", list(overrides)), world_size=batch // 2)
        assert "= 0.00125 per image" in scaled and "= 16,000 images" in scaled, scaled


def test_every_place_that_asks_cpus_per_gpu_asks_the_same_and_the_gpu_configs_workers_leave_two_for_training() -> None:
    # README "Sizing CPUs per GPU": train.workers loader workers + 2 cores for the training process itself.
    asked = {path: re.findall(r"^#SBATCH --cpus-per-task=(\d+)$", (REPO / path).read_text(), re.MULTILINE)
             for path in ("slurm/train_8gpu.sh", "docker/README.md")}
    asked = {path: int(found[0]) for path, found in asked.items() if len(found) == 1} | {
        "dist-kp submit": submit.parse_args(["--config", "coco_kp_r50_fpn"]).cpus_per_task}
    assert len(asked) == 3 and len(set(asked.values())) == 1, asked
    cpus = asked["dist-kp submit"]
    for name in ("coco_kp_r50_fpn", "finetune_custom_skeleton"):
        assert load_config(name).train.workers == cpus - 2, (name, cpus)
