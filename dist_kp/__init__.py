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

from typing import Any

__all__ = ["Hook"]


def __getattr__(name: str) -> Any:
    # Lazily: `import dist_kp` (every command) does not pay for torch and the engine.
    if name == "Hook":
        from dist_kp.engine.hooks import Hook

        return Hook
    raise AttributeError(f"module 'dist_kp' has no attribute {name!r}")
