"""dist_kp: distributed training of torchvision's Keypoint R-CNN (DDP, SLURM, object-store checkpoints, W&B).

Commands sit at the top (`python -m dist_kp.train`, `evaluate`, `predict`, `report`, `export`,
`submit`, and `dist-kp COMMAND`); the library lives in one folder per layer, data flowing down:

    config/       run configuration (pydantic), packaged configs, secrets, the reference table
    storage/      fsspec access with bounded requests (one Storage value, passed), the run folder
    distributed/  process group from torchrun/srun env, collectives, diagnostics, preemption signals
    data/         COCO index, samples, grouped distributed sampler, loaders, the synthetic set
    model/        Keypoint R-CNN builder and weights, precision, EMA of the weights
    evaluation/   COCO results and checks, backends, inference, the distributed evaluator
    engine/       trainer (the loop), hooks, run state, checkpoints, optimizer and LR schedule
    tracking/     rank 0's sinks as hooks: metrics file, W&B, TensorBoard, prediction pictures

`from dist_kp import Hook`: the base class of a training hook (dist_kp.engine.hooks).
"""

from __future__ import annotations

import gc
import sys
from typing import Any

__all__ = ["Hook"]

if sys.argv[:1] == ["-m"]:
    # Python is locating a module of this package to run as `python -m dist_kp.COMMAND` (sys.argv[0] is
    # "-m" only then). The command module's imports (torch, torchvision: ~350,000 objects) run without the
    # cyclic collector's passes over them, 0.65 s of the 4.1 s of CPU that `import dist_kp.train` takes;
    # the command's dist_kp.cli.as_process turns the collector back on, its imports frozen out of it.
    gc.disable()


def __getattr__(name: str) -> Any:
    # Lazily: `import dist_kp` (every command) does not pay for torch and the engine.
    if name == "Hook":
        from dist_kp.engine.hooks import Hook

        return Hook
    raise AttributeError(f"module 'dist_kp' has no attribute {name!r}")
