"""A config as dotted keys, and its fingerprint for comparing the ranks of one run.

    flatten({"optim": {"lr": 0.02}})   # {'optim.lr': 0.02}
    config_fingerprint(cfg)            # {'optim.lr': ('<sha256 of 0.02>', '0.02'), ...}

A fingerprint's digests are taken of the values themselves; the values it shows are those of the
JSON dump, so a credential in a URL or a storage option reads <redacted> (dist_kp.config.secrets).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from dist_kp.config import Config
from dist_kp.config.secrets import REDACTED

# Not compared across ranks: the index cache is node-local; where the data lies may differ per node,
# as long as its content does not (compared by dist_kp.data.fingerprint instead).
PER_RANK_KEYS = ("data.cache_dir", "data.root", "data.train_annotations", "data.val_annotations")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys (an empty dict stays a value)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def config_fingerprint(cfg: Config) -> dict[str, tuple[str, str]]:
    """Every dotted key of the resolved config but PER_RANK_KEYS: (sha256 of its value, its value as written)."""
    values, written = flatten(cfg.model_dump()), flatten(cfg.model_dump(mode="json"))
    return {key: (hashlib.sha256(_json(value).encode()).hexdigest(), _json(written.get(key, REDACTED)))
            for key, value in values.items() if key not in PER_RANK_KEYS}
