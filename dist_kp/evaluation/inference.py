"""Inference over a loader: this rank's COCO result records, one image per forward."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist_kp.evaluation.results import outputs_to_results
from dist_kp.model.precision import autocast


@torch.no_grad()
def predict(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
            category_id: int, precision: str = "fp32") -> list[dict[str, Any]]:
    """This rank's COCO result records for every image of its loader (eval mode, no grad, autocast to `precision`)."""
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    try:
        for images, targets, _ in loader:
            # One image per forward: batching pads images to a common size, which changes the
            # predictions, and the batches of a shard depend on the world size.
            with autocast(precision, device):
                outputs = [model([image.to(device, non_blocking=device.type == "cuda").float().div_(255.0)])[0]
                           for image in images]
            outputs = [{k: v.float() if v.is_floating_point() else v for k, v in o.items()} for o in outputs]
            records += outputs_to_results(outputs, [int(t["image_id"]) for t in targets], category_id)
    finally:
        model.train(was_training)
    return records
