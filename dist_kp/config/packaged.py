"""The configs shipped with dist_kp, selectable by name: `--config coco_kp_r50_fpn`.

The YAML files live in the repository's top-level configs/ folder, so every documented path
(`configs/synthetic_cpu.yaml`) stays valid; dist_kp/configs links to that folder, so an installed
wheel carries them as package data and a source checkout reads them in place.
"""

from __future__ import annotations

from pathlib import Path

from dist_kp.config.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SUFFIXES = (".yaml", ".yml")


def packaged_config_names() -> list[str]:
    """Names of the packaged configs (file names without .yaml)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []


def is_config_name(value: str) -> bool:
    """A bare name (no folder, no YAML suffix) means a packaged config; anything else is a path or URL."""
    return "/" not in value and "\\" not in value and not value.endswith(SUFFIXES)


def resolve_config(path: str | Path | None) -> str | Path | None:
    """The packaged file for a config name, or the path as given (None stays None).

    A name that is not packaged is still taken as a path when such a file exists; otherwise the
    error lists the packaged names.
    """
    if path is None or isinstance(path, Path) or not is_config_name(path):
        return path
    packaged = CONFIG_DIR / f"{path}.yaml"
    if packaged.is_file():
        return packaged
    if Path(path).is_file():
        return path
    raise ConfigError(f"no packaged config named {path!r} (packaged: {', '.join(packaged_config_names()) or 'none'});"
                      " give a name from that list or the path of a YAML file")
