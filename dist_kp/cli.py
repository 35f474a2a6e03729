"""dist-kp: the console command of dist_kp (installed by pip with the package).

usage:
  dist-kp {train,evaluate,predict,report,export} [ARGUMENTS ...]

Each command takes exactly the arguments of `python -m dist_kp.COMMAND` (`dist-kp train --help`);
those forms keep working. `--config` takes a YAML path or the name of a packaged config
(`dist-kp train --config synthetic_cpu ...`). Under torchrun:
  torchrun --nproc_per_node=8 --no-python dist-kp train --config coco_kp_r50_fpn ...
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dist_kp.config.packaged import packaged_config_names

COMMANDS = {
    "train": "train a model (alone, or as one worker of torchrun / srun)",
    "evaluate": "COCO keypoint and box AP of a weights file, or of a results JSON",
    "predict": "run a trained model on pictures: drawn people and a COCO results JSON",
    "report": "plots of a run's losses, lr, throughput, AP and predictions",
    "export": "write the model as ONNX (fixed input size) or TorchScript, plus a JSON sidecar",
}


def main(argv: list[str] | None = None) -> int:
    """Run `dist-kp COMMAND ARGS`: the module dist_kp.COMMAND's main with ARGS."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(f"dist_kp.{argv[0]}")  # only the command's own imports
        return module.main(argv[1:]) or 0
    parser = argparse.ArgumentParser(
        prog="dist-kp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:9s} {text}" for name, text in COMMANDS.items())
        + "\npackaged configs (--config NAME): " + ", ".join(packaged_config_names()))
    parser.add_argument("command", choices=list(COMMANDS), help="see below; then COMMAND --help")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the command's own arguments")
    parser.parse_args(argv)  # only reached without a known command: prints help or the usage error
    return 2


if __name__ == "__main__":
    sys.exit(main())
