"""Every README command that can run on a CPU runs (in a scratch folder, on a small demo)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from dist_kp.storage.run_folder import names_a_run_file
from tests.conftest import REPO, child_env

# Commands that need a GPU cluster, a remote bucket, your own files, or are the test suite itself.
NOT_ON_CPU = ("export ", "wandb ", "coco_kp_r50_fpn", "s3://", "/datasets/", "sbatch", "srun", "docker ", "apptainer ", "torchrun --nnodes",
              "launch/test.sh", "holiday/", "DIR", "a.jpg",
              "source .venv/bin/activate")  # the test's own interpreter is the environment's already


def readme_commands() -> list[str]:
    """Shell commands of the README's bash blocks, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def assert_every_file_is_named_by_the_run_folder(output_dir: Path) -> None:
    files = sorted(p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file())
    assert {"config.yaml", "metrics.jsonl", "model_final.pt", "report/losses.png"} <= set(files), files
    assert [f for f in files if not names_a_run_file(f)] == []


def test_readme_cpu_commands_run(tmp_path: Path) -> None:
    commands = [c for c in readme_commands() if not any(marker in c for marker in NOT_ON_CPU)]
    assert any(c.startswith("bash launch/demo.sh") for c in commands)
    env = child_env(DATA=str(tmp_path / "data/synthetic"), OUT=str(tmp_path / "runs/demo"))
    (tmp_path / "configs").symlink_to(REPO / "configs")
    ran = []
    for command in commands:
        if command.startswith("bash launch/demo.sh"):
            # The demo as written, cut to a few steps (its overrides pass through to dist_kp.train).
            argv = ["bash", str(REPO / "launch/demo.sh"), "train.max_steps=6", "eval.max_images=6"]
        else:
            argv = shlex.split(command)
            if argv[0] == "python":
                argv[0] = sys.executable
            if "dist_kp.train" in argv:
                argv.append("train.max_steps=2")
            eval_dirs = sorted((tmp_path / "runs/demo/eval").iterdir())
            argv = [re.sub(r"runs/demo/eval/\d+", str(eval_dirs[-1].relative_to(tmp_path)), a) for a in argv]
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        if command.startswith("bash launch/demo.sh"):
            assert_every_file_is_named_by_the_run_folder(tmp_path / "runs/demo")
        ran.append(argv[1] if argv[0] == "bash" else argv[2])
    assert {"dist_kp.train", "dist_kp.evaluate", "dist_kp.predict", "dist_kp.submit"} <= set(ran), ran
