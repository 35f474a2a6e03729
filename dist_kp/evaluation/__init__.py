"""Distributed COCO evaluation: OKS for keypoints, IoU for boxes; numbers independent of world size.

Each rank runs inference on its own unpadded shard and the per-image matching for its own
images (the expensive part); rank 0 merges the per-image results of every rank into one
accumulate/summarize. The other ranks send their per-image records and result records as
arrays, one per field (no Python object per record to pickle); rank 0 rebuilds them once. What "exact" means here:

- the stats do not depend on the number of processes: 1, 2, 3 ... ranks give bit-identical numbers;
- the pycocotools backend gives bit for bit what pycocotools run once on all results gives;
- faster_coco_eval matches the same pairs but accumulates in C++ in another order, so its stats
  may differ from pycocotools' in the last bit (depending on the CPU); they agree within 1e-12.

Keypoint stats follow the COCO keypoint protocol: a detection's area (which decides whether it
counts as medium or large) is the area of its keypoints' extent, as pycocotools' loadRes computes
it for keypoint results, even when the record also carries a box (`keypoint_area="box"` takes the
box's area instead, detectron2's convention). The box evaluation always uses the boxes.

One class per backend (`backend_for(name)`) wraps the library behind coco / detections / match /
merge. The internals still relied upon (the per-image record layout, pycocotools' `_paramsEval`,
faster_coco_eval's `_evalImgs_cpp`) are checked by tests/test_eval_backends.py.
"""
