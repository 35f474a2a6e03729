"""dist_kp installs like a tool: `pip install .` from a fresh checkout gives the dist-kp command and the configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

from dist_kp import cli
from tests.conftest import REPO, child_env


def fresh_checkout(destination: Path) -> Path:
    """What a clone of the working tree holds: tracked files and new files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if not os.path.lexists(source):
            continue  # deleted in the working tree, not yet in the index
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    return destination


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with dist_kp installed by `python -m pip install .` (offline: no index, no dependencies).

    The venv sees this environment's packages (torch, pip, setuptools...) through a .pth line, after
    its own site-packages, so dist_kp itself comes from the new install and nothing is downloaded.
    """
    assert shutil.which("git") is not None, "git is needed to list the files of a checkout"
    tmp = tmp_path_factory.mktemp("install")
    source = fresh_checkout(tmp / "src")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "_outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: pip sees this environment's (editable) dist_kp and must not uninstall it.
    result = subprocess.run([python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                             "--ignore-installed", "--quiet", "."], cwd=source, env=child_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shutil.rmtree(source)  # the installed package must not need its sources
    return venv


def test_dist_kp_help_lists_the_commands_and_the_packaged_configs(installed: Path, tmp_path: Path) -> None:
    result = subprocess.run([installed / "bin" / "dist-kp", "--help"], cwd=tmp_path, env=child_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("train", "evaluate", "predict", "report", "export"):
        assert f"  {command} " in result.stdout
    assert "coco_kp_r50_fpn, finetune_custom_skeleton, synthetic_cpu" in result.stdout


def test_dist_kp_train_help_is_the_train_modules_help(installed: Path, tmp_path: Path) -> None:
    result = subprocess.run([installed / "bin" / "dist-kp", "train", "--help"], cwd=tmp_path, env=child_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout and "config sections:" in result.stdout
    assert result.stdout.startswith("usage: dist-kp train ")


def test_the_installed_dist_kp_says_its_version(installed: Path, tmp_path: Path) -> None:
    result = subprocess.run([installed / "bin" / "dist-kp", "--version"], cwd=tmp_path, env=child_env(),
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (0, "dist-kp 0.1.0\n"), result.stderr


def test_the_wheel_installs_the_dist_kp_package_alone_no_top_level_launch(installed: Path) -> None:
    site = Path(subprocess.run([installed / "bin" / "python", "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    record = next(site.glob("dist_kp-*.dist-info")) / "RECORD"
    top_level = {line.split(",")[0].split("/")[0] for line in record.read_text().splitlines()}
    assert {name for name in top_level if not name.startswith(("dist_kp-", ".."))} == {"dist_kp"}, top_level
    assert not (site / "launch").exists()
    assert (site / "dist_kp" / "submit.py").is_file()  # the submitit launcher: dist-kp submit


def test_dist_kp_version_prints_the_version_of_the_installed_distribution(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"dist-kp {metadata.version('dist_kp')}\n"


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_commands_help_names_it_as_a_dist_kp_command(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: dist-kp {command} ")


def test_submit_help_shows_the_defaults(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["submit", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 1)", "(default: 8)", "(default: 4)", "(default: 2880)", "(default: 120)",
                    "(default: dist_kp)", "(default: OUTPUT_DIR/submitit;"):
        assert default in shown, default


def test_the_installed_package_loads_its_own_configs_by_name_and_carries_the_license(
        installed: Path, tmp_path: Path) -> None:
    code = ("import dist_kp, importlib.metadata as m; from dist_kp.config import load_config; "
            "from dist_kp.config.packaged import resolve_config; "
            "print(dist_kp.__file__); print(resolve_config('coco_kp_r50_fpn')); "
            "print(load_config('finetune_custom_skeleton').model.weights); "
            "print(m.metadata('dist_kp')['License-Expression'])")
    result = subprocess.run([installed / "bin" / "python", "-c", code], cwd=tmp_path, env=child_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    module, config, weights, license_name = result.stdout.split("\n")[:4]
    assert Path(module).is_relative_to(installed) and Path(config).is_relative_to(installed)
    assert Path(config).name == "coco_kp_r50_fpn.yaml" and Path(config).is_file()
    assert weights == "KeypointRCNN_ResNet50_FPN_Weights.COCO_V1"
    assert license_name == "BSD-3-Clause"


def test_python_m_dist_kp_is_the_same_command_and_an_unknown_command_is_refused(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "dist_kp", "export", "--help"], cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--format {onnx,torchscript}" in result.stdout, result.stderr
    result = subprocess.run([sys.executable, "-m", "dist_kp", "fit"], cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "invalid choice: 'fit'" in result.stderr


def test_a_command_process_keeps_its_imports_out_of_the_garbage_collectors_walks(tmp_path: Path) -> None:
    # Frozen before main runs (torch's objects: the collections of the run skip them) and again when it
    # returns (what main imported: shutdown skips it). main's exit status is the process's.
    code = ("import atexit, gc, sys, torch\nfrom dist_kp.cli import as_process\n"
            "atexit.register(lambda: print('at exit', gc.get_freeze_count()))\n"
            "def main():\n    print('in main', gc.get_freeze_count())\n    import torchvision\n    return 3\n"
            "sys.exit(as_process(main))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=child_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    counts = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines())
    assert int(counts["in main"]) > 100_000  # torch alone
    assert int(counts["at exit"]) > int(counts["in main"]) + 10_000  # torchvision, imported by main


# Reports, in the process it is loaded into, whether the collector is on when torch is imported and at exit.
GC_WATCH = """import atexit, gc, sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("collector at torch import:", gc.isenabled(), file=sys.stderr)
sys.meta_path.insert(0, Watch())
atexit.register(lambda: print("collector at exit:", gc.isenabled(), file=sys.stderr))
"""


@pytest.mark.parametrize("how", ["python -m", "dist-kp"])
def test_a_command_imports_without_the_collector_and_runs_with_it(how: str, tmp_path: Path) -> None:
    # The command module's imports (torch's ~350,000 objects) skip the collector's passes; main runs with it on.
    (tmp_path / "sitecustomize.py").write_text(GC_WATCH)
    argv = ([sys.executable, "-m", "dist_kp.train"] if how == "python -m"
            else [str(Path(sys.executable).with_name("dist-kp")), "train"])
    result = subprocess.run([*argv, "--help"], cwd=tmp_path, env=child_env(PYTHONPATH=str(tmp_path)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--config" in result.stdout, result.stderr
    assert result.stderr.splitlines()[-2:] == ["collector at torch import: False", "collector at exit: True"]
    # Nothing else turns it off: the same import in a plain interpreter has it on.
    result = subprocess.run([sys.executable, "-c", "import dist_kp.train"], cwd=tmp_path,
                            env=child_env(PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert result.stderr.splitlines()[-2:] == ["collector at torch import: True", "collector at exit: True"]


# Every module of the package that runs as `python -m` (the collector is off while it is imported);
# cli.py's own `__main__` goes through console(), which is as_process too.
MAIN_MODULES = sorted(path.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
                      for path in (REPO / "dist_kp").rglob("*.py")
                      if 'if __name__ == "__main__":' in path.read_text() and path.name != "cli.py")


def test_every_command_is_found_among_the_modules_that_run_as_python_m() -> None:
    assert {module for module, _ in cli.COMMANDS.values()} | {"dist_kp.data.index_cache"} <= set(MAIN_MODULES)


@pytest.mark.parametrize("module", MAIN_MODULES)
def test_every_command_module_runs_its_main_as_a_process_through_as_process(module: str) -> None:
    source = (REPO / (module.replace(".", "/") + ".py")).read_text()
    assert source.rstrip().endswith('if __name__ == "__main__":\n    sys.exit(as_process(main))'), module
