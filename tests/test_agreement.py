"""Every rank the same: ranks started with another config, other data or other versions are refused
at start on every rank, naming the keys and the ranks (dist_kp.distributed.agreement)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dist_kp.config import load_config
from dist_kp.config.fingerprint import config_fingerprint
from dist_kp.distributed.agreement import RanksDisagree, check_agreement, disagreements, version_fingerprint
from tests.conftest import TINY_CONFIG, child_env, run_module, tiny_overrides

TRAIN_JSON = "annotations/person_keypoints_train2017.json"


def changed_copy(root: Path, dest: Path) -> Path:
    """A copy of the dataset at `dest` whose training annotations differ in one keypoint coordinate."""
    shutil.copytree(root, dest)
    annotations = dest / TRAIN_JSON
    data = json.loads(annotations.read_text())
    data["annotations"][0]["keypoints"][0] += 1.0
    annotations.write_text(json.dumps(data))
    return dest


def run_with_rank1(data: Path, out: Path, rank1_overrides: str) -> subprocess.CompletedProcess:
    """Two ranks under torchrun, rank 1 with `rank1_overrides` appended to the same command line."""
    args = ["--config", str(TINY_CONFIG),
            *tiny_overrides(data, out, "train.workers=0", "eval.every_epochs=0", "eval.at_end=false",
                            "train.max_steps=2")]
    return run_module("tests.rank_override", args, nproc=2, env=child_env(RANK1_OVERRIDES=rank1_overrides))


def refusals(result: subprocess.CompletedProcess) -> dict[str, str]:
    """Each rank's logged refusal: {"rank0": message, "rank1": message}."""
    return dict(re.findall(r"\[(rank\d)\] ERROR dist_kp\.train: rank \d: (ranks disagree: .*)", result.stderr))


def assert_refused_before_training(result: subprocess.CompletedProcess, out: Path) -> str:
    """Every rank refused with the same message, and nothing of the run was written; the message."""
    assert result.returncode != 0, result.stderr[-3000:]
    messages = refusals(result)
    assert set(messages) == {"rank0", "rank1"}, result.stderr[-3000:]
    assert messages["rank0"] == messages["rank1"]
    assert "exitcode  : 2" in result.stderr  # the error's exit status, not a crash (torchrun's report)
    assert "training failed" not in result.stderr
    assert not out.exists()  # no config.yaml, no checkpoint
    return messages["rank0"]


# The pure comparison.

def test_fingerprints_that_agree_raise_nothing() -> None:
    fingerprint = {"optim.lr": ("a", "0.02"), "version of torch": ("2.5", "2.5")}
    assert disagreements([fingerprint, dict(fingerprint), dict(fingerprint)]) == []
    check_agreement([fingerprint, dict(fingerprint)])


def test_a_differing_key_is_named_with_each_value_and_its_ranks() -> None:
    common = {"optim.lr": ("a", "0.02"), "train.seed": ("s", "0")}
    other = {"optim.lr": ("b", "0.5"), "train.seed": ("s", "0")}
    assert disagreements([common, other, common]) == ["optim.lr is 0.02 on ranks 0, 2, 0.5 on rank 1"]
    with pytest.raises(RanksDisagree, match=r"^ranks disagree: optim\.lr is 0\.02 on ranks 0, 2, 0\.5 on rank 1\."):
        check_agreement([common, other, common])


def test_every_differing_key_is_named_and_a_key_one_rank_lacks_reads_missing() -> None:
    first = {"optim.lr": ("a", "0.02"), "train.batch_size": ("4", "4"), "version of torch": ("2.5", "2.5")}
    second = {"optim.lr": ("a", "0.02"), "train.batch_size": ("2", "2")}
    assert disagreements([first, second]) == ["train.batch_size is 4 on rank 0, 2 on rank 1",
                                              "version of torch is 2.5 on rank 0, missing on rank 1"]


def test_values_that_read_the_same_but_differ_are_named_without_values() -> None:
    first, second = {"storage.options.x": ("d1", '"<redacted>"')}, {"storage.options.x": ("d2", '"<redacted>"')}
    assert disagreements([first, second]) == ["storage.options.x differs between rank 0 and rank 1 (values not shown)"]


def test_a_password_in_the_config_is_compared_but_never_shown() -> None:
    def fingerprint(password: str) -> dict:
        url = f"storage.options.client_kwargs.endpoint_url=http://user:{password}@127.0.0.1:8333"
        return config_fingerprint(load_config(TINY_CONFIG, [url]))

    fingerprints = [fingerprint("hunter2"), fingerprint("letmein")]
    lines = disagreements(fingerprints)
    assert lines == ["storage.options.client_kwargs.endpoint_url differs between rank 0 and rank 1 (values not shown)"]
    assert not any("hunter2" in text or "letmein" in text for fp in fingerprints for _, text in fp.values())


def test_where_the_data_lies_and_the_index_cache_are_not_compared(tmp_path: Path) -> None:
    here = config_fingerprint(load_config(TINY_CONFIG, ["data.root=/nodes/a/coco", "data.cache_dir=/tmp/a"]))
    there = config_fingerprint(load_config(TINY_CONFIG, ["data.root=/nodes/b/coco", "data.cache_dir=/tmp/b"]))
    assert disagreements([here, there]) == []  # the content is compared instead (dist_kp.data.fingerprint)
    lr = config_fingerprint(load_config(TINY_CONFIG, ["optim.lr=0.5"]))
    assert disagreements([here, lr]) == ["optim.lr is 0.02 on rank 0, 0.5 on rank 1"]


def test_versions_of_dist_kp_torch_and_torchvision_are_compared() -> None:
    installed = {"dist_kp": "0.3.0", "torch": "2.5.1", "torchvision": "0.20.1", "git_commit": "abc"}
    older = {**installed, "torch": "2.4.0", "git_commit": "def"}
    assert disagreements([version_fingerprint(installed), version_fingerprint(older)]) == [
        "version of torch is 2.5.1 on rank 0, 2.4.0 on rank 1"]


# Two ranks under torchrun.

def test_a_learning_rate_that_differs_on_one_rank_is_refused_on_every_rank(tmp_path: Path,
                                                                          synthetic_root: Path) -> None:
    out = tmp_path / "run"
    message = assert_refused_before_training(run_with_rank1(synthetic_root, out, "optim.lr=0.5"), out)
    assert message.startswith("ranks disagree: optim.lr is 0.02 on rank 0, 0.5 on rank 1.")


def test_a_batch_size_that_differs_on_one_rank_is_named_not_a_collective_mismatch(tmp_path: Path,
                                                                                 synthetic_root: Path) -> None:
    out = tmp_path / "run"
    result = run_with_rank1(synthetic_root, out, "train.batch_size=2")
    message = assert_refused_before_training(result, out)
    assert "train.batch_size is 4 on rank 0, 2 on rank 1" in message
    assert "mismatch" not in result.stderr.lower()


def test_annotations_that_differ_between_ranks_name_the_data_file(tmp_path: Path, synthetic_root: Path) -> None:
    copy = changed_copy(synthetic_root, tmp_path / "copy")
    out = tmp_path / "run"
    message = assert_refused_before_training(run_with_rank1(synthetic_root, out, f"data.root={copy}"), out)
    assert re.search(rf"data\.train_annotations content is sha256 \w{{12}} \({re.escape(str(synthetic_root))}/"
                     rf"{TRAIN_JSON}\) on rank 0, sha256 \w{{12}} \({re.escape(str(copy))}/{TRAIN_JSON}\) on rank 1",
                     message), message
    # The validation annotations lie elsewhere too, but hold the same: not a difference.
    assert "val_annotations" not in message and "data.root" not in message
