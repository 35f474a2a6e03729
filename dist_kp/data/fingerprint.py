"""What the data of a run is, wherever it lies: annotation contents and the training image count.

    data_fingerprint(train, cfg.data.min_visible_keypoints)        # what a checkpoint records
    data_fingerprint(train, cfg.data.min_visible_keypoints, val)   # what the ranks compare at start

Keys map to (digest, shown) as dist_kp.distributed.agreement compares them. The digests are the
sha256 the index cache took of each annotation file anyway: nothing is read again.
"""

from __future__ import annotations

from dist_kp.config.secrets import redact_url
from dist_kp.data.coco import min_visible_for_skeleton, trainable_images
from dist_kp.data.index_cache import CachedKeypointIndex

TRAIN_CONTENT = "data.train_annotations content"
VAL_CONTENT = "data.val_annotations content"
TRAINING_IMAGES = "training images"


def annotation_fact(index: CachedKeypointIndex) -> tuple[str, str]:
    """(sha256 of the annotation file, the digest's start and the file) for a message."""
    return index.sha256, f"sha256 {index.sha256[:12]} ({redact_url(index.source)})"


def data_fingerprint(train: CachedKeypointIndex, min_visible_keypoints: int | None,
                     val: CachedKeypointIndex | None = None) -> dict[str, tuple[str, str]]:
    """The training annotations' content and image count (data.min_visible_keypoints as configured: None
    follows the skeleton); the validation annotations' content when given."""
    minimum = min_visible_for_skeleton(min_visible_keypoints, train.meta.num_keypoints)
    images = str(len(trainable_images(train, minimum)))
    fingerprint = {TRAIN_CONTENT: annotation_fact(train), TRAINING_IMAGES: (images, images)}
    if val is not None:
        fingerprint[VAL_CONTENT] = annotation_fact(val)
    return fingerprint
