"""dist-kp: the console command of dist_kp (installed by pip with the package).

usage:
  dist-kp {train,evaluate,predict,report,export,synthetic,submit,sweep} [ARGUMENTS ...]
  dist-kp --version

Each command takes exactly the arguments of `python -m dist_kp.COMMAND` (`dist-kp train --help`);
those forms keep working (synthetic is dist_kp.data.synthetic). `--config` takes a YAML path or
the name of a packaged config (`dist-kp train --config synthetic_cpu ...`). Under torchrun:
  torchrun --nproc_per_node=8 --no-python dist-kp train --config coco_kp_r50_fpn ...
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
from collections.abc import Callable
from importlib import metadata

from dist_kp.config.packaged import packaged_config_names

# command: (module whose main(argv) runs it, what it does)
COMMANDS = {
    "train": ("dist_kp.train", "train a model (alone, or as one worker of torchrun / srun)"),
    "evaluate": ("dist_kp.evaluate", "COCO keypoint and box AP of a weights file, or of a results JSON"),
    "predict": ("dist_kp.predict", "run a trained model on pictures: drawn people and a COCO results JSON"),
    "report": ("dist_kp.report", "plots of a run's losses, lr, throughput, AP and predictions"),
    "export": ("dist_kp.export", "write the model as ONNX (fixed input size) or TorchScript, plus a JSON sidecar"),
    "synthetic": ("dist_kp.data.synthetic", "write a synthetic COCO person-keypoints dataset (demo, tests)"),
    "submit": ("dist_kp.submit", "submit the training through submitit to SLURM, or run it in a local process"),
    "sweep": ("dist_kp.sweep", "one training per point of a grid of overrides: a SLURM job array, or local; --status"),
}


def version() -> str:
    """dist_kp's installed version ("unknown" when run from sources that were never installed)."""
    try:
        return metadata.version("dist_kp")
    except metadata.PackageNotFoundError:
        return "unknown"


def as_process(main: Callable[[], int | None]) -> int:
    """Run a command's `main()` as the whole work of this process; returns its exit status.

    What exists before main runs (every imported module: ~350,000 objects once torch is imported) and
    when it returns is frozen out of the cyclic garbage collector, so the collections during the run
    and the interpreter's shutdown do not walk it again: ~1 s less CPU per process that imports torch
    (`import dist_kp.train` then exit: 4.0 s -> 3.1 s). Python finalizes nothing still alive at exit
    anyway (no promise of `__del__`); dist_kp closes its files and joins its threads itself.
    The imports before it ran with the collector off (dist_kp/__init__.py, console): it is on from here.
    """
    gc.freeze()
    gc.enable()
    try:
        return main() or 0
    finally:
        gc.freeze()


def console() -> int:
    """The `dist-kp` console command."""
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command in COMMANDS:
        gc.disable()  # its module's imports as under `python -m dist_kp.COMMAND`: as_process turns it on
        importlib.import_module(COMMANDS[command][0])
    return as_process(main)


def main(argv: list[str] | None = None) -> int:
    """Run `dist-kp COMMAND ARGS`: the command module's main with ARGS."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])  # only the command's own imports
        return module.main(argv[1:]) or 0
    parser = argparse.ArgumentParser(
        prog="dist-kp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:9s} {text}" for name, (_, text) in COMMANDS.items())
        + "\npackaged configs (--config NAME): " + ", ".join(packaged_config_names()))
    parser.add_argument("--version", action="version", version=f"dist-kp {version()}")
    parser.add_argument("command", choices=list(COMMANDS), help="see below; then COMMAND --help")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the command's own arguments")
    parser.parse_args(argv)  # only reached without a known command: prints help, the version or the usage error
    return 2


if __name__ == "__main__":
    sys.exit(console())
