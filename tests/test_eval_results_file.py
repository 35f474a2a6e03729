"""`evaluate --results` with a file COCO evaluation cannot take: the file, the first bad record, the rule.

No library traceback: exit status 2 and one error line. Results of another category than the
annotations' keypoint category are evaluated (they count for nothing) with a warning that gives
their number and the first one.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, child_env, run_module


def val_json(root: Path) -> Path:
    return root / "annotations" / "person_keypoints_val2017.json"


def good_results(root: Path) -> list[dict]:
    gt = json.loads(val_json(root).read_text())
    return [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "bbox": a["bbox"],
             "score": 0.9} for a in gt["annotations"] if not a["iscrowd"]]


def evaluate(root: Path, results_path: Path) -> tuple[int, str]:
    result = run_module("dist_kp.evaluate", ["--annotations", str(val_json(root)), "--results", str(results_path),
                                             "--out", str(results_path.parent / "out")])
    return result.returncode, result.stderr


# `python -m dist_kp.evaluate ARGS`, then the names of torch's packages that the process imported.
IMPORTS_PROBE = """
import runpy, sys
try:
    runpy.run_module("dist_kp.evaluate", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    status = exit.code
print(status, [name for name in ("torch", "torchvision") if name in sys.modules])
"""


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_a_results_file_is_evaluated_without_importing_torch(synthetic_root: Path, tmp_path: Path,
                                                             backend: str) -> None:
    from dist_kp.data.index import load_index
    from dist_kp.evaluation.results import ground_truth
    from dist_kp.evaluation.results_file import evaluate_results
    from dist_kp.storage import Storage

    rng = np.random.default_rng(0)
    moved = [(np.asarray(r["keypoints"]).reshape(-1, 3) + rng.normal(0, 4, (17, 3)) * [1, 1, 0]).round(2)
             for r in good_results(synthetic_root)]  # x and y moved, visibility kept: AP strictly in (0, 1)
    records = [dict(r, keypoints=kps.reshape(-1).tolist(), score=round(float(rng.uniform(0.1, 1)), 4))
               for r, kps in zip(good_results(synthetic_root), moved)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(records))
    probe = subprocess.run([sys.executable, "-c", IMPORTS_PROBE, "--annotations", str(val_json(synthetic_root)),
                            "--results", str(path), "--backend", backend], cwd=REPO, env=child_env(),
                           capture_output=True, text=True, timeout=300)
    assert probe.stdout.split("\n")[-2] == "0 []", probe.stdout[-2000:] + probe.stderr[-3000:]
    index = load_index(str(val_json(synthetic_root)), Storage())
    expected = evaluate_results(ground_truth(index), records, backend, None).metrics
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == expected and 0 < written["kp/AP"] < 1


def spoil(records: list[dict], case: str) -> list[dict]:
    """The records with record 3 broken the way `case` says."""
    bad = dict(records[3])
    if case == "unknown image id":
        bad["image_id"] = 987654
    elif case == "nan score":
        bad["score"] = math.nan
    elif case == "short keypoints":
        bad["keypoints"] = bad["keypoints"][:-3]
    return records[:3] + [bad] + records[4:]


@pytest.mark.parametrize("case, rule", [
    ("unknown image id", "image_id 987654 is not the id of an image of"),
    ("nan score", "score is a finite number"),
    ("short keypoints", "keypoints has 48 values, expected 51 (17 keypoints x (x, y, v))"),
])
def test_a_bad_record_is_named_with_its_file_and_rule(synthetic_root: Path, tmp_path: Path, case: str,
                                                      rule: str) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(spoil(good_results(synthetic_root), case)))  # json writes NaN as NaN
    code, log = evaluate(synthetic_root, path)
    assert code == 2, log[-3000:]
    assert "Traceback" not in log
    assert f"{path}: record 3 " in log and rule in log


def test_a_binary_file_is_named_as_not_json_text(synthetic_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    code, log = evaluate(synthetic_root, path)
    assert code == 2, log[-3000:]
    assert "Traceback" not in log and f"{path} is not a JSON text file" in log


def test_results_of_an_unknown_category_are_counted_in_a_warning(synthetic_root: Path, tmp_path: Path) -> None:
    records = good_results(synthetic_root)
    records = [dict(r, category_id=7) if i % 2 else r for i, r in enumerate(records)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(records))
    code, log = evaluate(synthetic_root, path)
    assert code == 0, log[-3000:]
    others = sum(1 for r in records if r["category_id"] == 7)
    assert f"{others} of {len(records)} results have a category_id that is not the keypoint category" in log
    assert "the first is record 1 " in log and '"category_id": 7' in log
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["kp/AP"] > 0


def test_check_results_names_the_rule_of_each_kind_of_bad_record() -> None:
    from dist_kp.evaluation.results import EvaluationError, check_results

    good = {"image_id": 1, "category_id": 1, "keypoints": [1.0, 2.0, 1] * 17, "score": 0.5, "bbox": [1, 2, 3, 4]}
    cases = [
        ({"records": 1}, "expected a JSON list of COCO result records, got a JSON dict"),
        ([good, [1, 2]], r"record 1 \[1, 2\]: a result record is a JSON object"),
        ([good, {k: v for k, v in good.items() if k != "score"}], "record 1 .*: has no score"),
        ([good, {k: v for k, v in good.items() if k != "bbox"}], "has no bbox; a bbox is in every record or in none"),
        ([good, dict(good, image_id="1")], "image_id '1' is not the id of an image of gt.json"),
        ([dict(good, score=True)], "record 0 .*: score is a finite number"),
        ([good, dict(good, keypoints=[1.0, None, 1] * 17)], "record 1 .*: keypoints are finite numbers"),
        ([good, good, dict(good, keypoints=[math.inf, 1, 1] * 17)], "record 2 .*: keypoints are finite numbers"),
        ([good, dict(good, bbox=[1, 2, -3, 4])], "record 1 .*: bbox width and height are >= 0"),
        ([good, dict(good, bbox=[1, 2, 3])], "record 1 .*: bbox is 4 numbers"),
    ]
    for results, rule in cases:
        with pytest.raises(EvaluationError, match=rule) as refused:
            check_results(results, "r.json", {1, 2}, 1, 17, "gt.json")
        assert str(refused.value).startswith("r.json: ")
    check_results([good, dict(good, image_id=2, bbox=[0.5, 0, 0, 0])], "r.json", {1, 2}, 1, 17, "gt.json")
    check_results([], "r.json", {1, 2}, 1, 17, "gt.json")


@pytest.mark.parametrize("out", ["a_file", "a_file/metrics"])
def test_an_out_folder_that_a_file_is_in_the_way_of_is_named_before_evaluating(synthetic_root: Path, tmp_path: Path,
                                                                               out: str) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(good_results(synthetic_root)))
    (tmp_path / "a_file").write_text("kept")
    result = run_module("dist_kp.evaluate", ["--annotations", str(val_json(synthetic_root)), "--results", str(path),
                                             "--out", str(tmp_path / out)])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"--out {tmp_path / out} cannot be a folder: a file is in the way" in result.stderr
    assert (tmp_path / "a_file").read_text() == "kept"
