"""The README stays true: its config reference matches the models."""

from __future__ import annotations

from dist_kp.config import Config
from dist_kp.config.reference import README, nested_model, readme_section, render


def test_readme_config_reference_matches_the_models() -> None:
    assert readme_section(README.read_text()) == render(), (
        "README's config reference is stale: run `python -m dist_kp.config.reference --write`"
    )


def test_config_reference_names_every_key() -> None:
    text = render()
    for section, field in Config.model_fields.items():
        sub = getattr(field.annotation, "model_fields", None)
        keys = [f"{section}.{k}" for k in sub] if sub else [section]
        # Keys that hold a section of their own when set (train.early_stop.metric, ...).
        keys += [f"{section}.{k}.{inner}" for k, f in (sub or {}).items() if nested_model(f.annotation)
                 for inner in nested_model(f.annotation).model_fields]
        for key in keys:
            assert f"| `{key}` |" in text


def test_config_reference_explains_every_key() -> None:
    unexplained = [line.split("|")[1].strip() for line in render().splitlines()
                   if line.startswith("| `") and not line.rstrip(" |").rsplit("|", 1)[-1].strip()]
    assert not unexplained, f"config keys without a description: {unexplained}"
