"""bench/bench_gpu.py's CPU rehearsal: every row of the GPU matrix measured, and the correctness pass run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, child_env

OPTIONS = ("channels_last", "cudnn_benchmark", "foreach_sgd", "fused_sgd", "decode_device", "prefetch",
           "compile_backbone")
COMPILED = {"compile_backbone", "all+compile"}


def test_the_dry_run_measures_every_row_of_the_matrix_and_passes_the_correctness_pass(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, "bench/bench_gpu.py", "--dry-run", "--steps", "1", "--warmup", "0",
               "--correctness-steps", "4", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = {(r["name"], r["batch"], r["precision"]): r for r in report["rows"]}
    expected = {(name, batch, precision) for batch in (2, 4) for precision in ("fp32", "bf16")
                for name in ("baseline", "dist_kp", "all")}
    expected |= {(name, 4, "bf16") for name in (*OPTIONS, "all+compile")}
    assert set(rows) == expected and len(report["rows"]) == len(expected)
    for (name, batch, precision), row in rows.items():
        if name in COMPILED:
            assert row["error"].startswith("skipped in a dry run"), row
            continue
        assert row["error"] is None, row
        assert row["images_per_s"] > 0 and row["step_ms"] > 0
        assert all(row[f"{phase}_ms"] > 0 for phase in ("data", "forward", "backward", "optimizer")), row
        assert row["ratio_to_baseline"] > 0
    assert rows[("baseline", 2, "fp32")]["ratio_to_baseline"] == 1.0
    assert "| all | 4 | bf16 |" in result.stdout  # the table
    correctness = report["correctness"]
    assert "data.decode=device" in correctness["options"] and "train.channels_last=true" in correctness["options"]
    for command in ("train", "resume_from_half", "evaluate", "predict"):
        assert correctness[command]["exit_status"] == 0, (command, correctness[command])
    assert [correctness[k]["exit_status"] for k in correctness if k.startswith("export_")] == [0]
    assert correctness["resume"]["bit_exact"], correctness["resume"]  # on the CPU, with every option on
    assert "kp/AP" in correctness["evaluate"]["metrics"]
