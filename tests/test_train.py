"""End to end: the training CLI alone and under torchrun on generated data."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.conftest import TINY_CONFIG, check, run_module, tiny_overrides

NO_EVAL = ("eval.every_epochs=0", "eval.at_end=false")


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def fingerprints(log: str) -> list[str]:
    return re.findall(r"model replicas identical on (\d+) ranks \(sha256 (\w+)\)", log)


def test_two_processes_under_torchrun_learn_and_stay_identical(tmp_path: Path, synthetic_root: Path) -> None:
    out = tmp_path / "run"
    args = ["--config", str(TINY_CONFIG),
            *tiny_overrides(synthetic_root, out, "train.max_steps=36", "train.workers=1", *NO_EVAL)]
    result = check(run_module("dist_kp.train", args, nproc=2))
    logged = records(out)
    assert [r["step"] for r in logged] == list(range(1, 37))
    first, last = logged[0]["train/loss"], logged[-1]["train/loss_smoothed"]
    assert last < 0.75 * first, f"smoothed loss went from {first:.3f} to {last:.3f}"
    for term in ("loss_classifier", "loss_box_reg", "loss_keypoint", "loss_objectness", "loss_rpn_box_reg"):
        assert f"train/{term}" in logged[-1]
    assert {"lr", "images_per_s", "data_time_s", "epoch", "batch"} <= logged[-1].keys()
    assert fingerprints(result.stderr)[0][0] == "2"
    # Only rank 0 reports progress; the node's index cache is the exception (setup_logging): whichever rank
    # waits for its lock or builds it says so (which rank that is, is a race between the two).
    assert [line for line in result.stderr.splitlines()
            if "[rank1] INFO" in line and "INFO dist_kp.data.index_cache:" not in line] == []
    assert (out / "config.yaml").exists()


def test_one_process_without_torchrun_trains(tmp_path: Path, synthetic_root: Path) -> None:
    out = tmp_path / "single"
    args = ["--config", str(TINY_CONFIG),
            *tiny_overrides(synthetic_root, out, "train.max_steps=4", "train.workers=0", *NO_EVAL)]
    result = check(run_module("dist_kp.train", args))
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]
    assert "world size 1" in result.stderr
    assert fingerprints(result.stderr)[0][0] == "1"


def test_a_diverging_loss_stops_every_rank_with_the_step_and_terms(tmp_path: Path, synthetic_root: Path) -> None:
    out = tmp_path / "diverge"
    args = ["--config", str(TINY_CONFIG),
            *tiny_overrides(synthetic_root, out, "optim.lr=1.0e6", "optim.clip_grad_norm=null",
                            "schedule.warmup_iters=0", "train.max_steps=30", "train.workers=0",
                            "train.dist_timeout_s=900", *NO_EVAL)]
    # A rank left waiting would wait for the 900 s collective timeout: the 300 s run timeout fails the test.
    result = run_module("dist_kp.train", args, nproc=2, timeout=300)
    assert result.returncode != 0
    assert re.search(r"non-finite loss at step \d+ .*loss_keypoint", result.stderr)
    assert "[rank0] ERROR" in result.stderr and "[rank1] ERROR" in result.stderr


def test_oks_sigmas_of_the_wrong_length_stop_the_run_before_the_first_step(tmp_path: Path,
                                                                            synthetic_root: Path) -> None:
    out = tmp_path / "sigmas"
    args = ["--config", str(TINY_CONFIG),
            *tiny_overrides(synthetic_root, out, "eval.sigmas=[0.05,0.05,0.05,0.05]", "train.max_steps=4",
                            "train.workers=0")]
    result = run_module("dist_kp.train", args)
    assert result.returncode == 1
    assert "eval.sigmas has 4 OKS sigmas but the dataset has 17 keypoints" in result.stderr
    assert "Traceback" not in result.stderr and not (out / "metrics.jsonl").exists()
