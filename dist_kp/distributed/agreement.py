"""Every rank the same: each rank's fingerprint (resolved config, data, versions) compared in one collective.

    fingerprint = {**config_fingerprint(cfg), **data_fingerprint(index, 5), **version_fingerprint(versions())}
    distributed.check_ranks_agree(fingerprint)   # RanksDisagree on every rank, naming the keys and the ranks

A fingerprint maps a key ("optim.lr", "data.train_annotations content", "version of torch") to a
Fact: the digest that is compared and the text a message shows. The text of a credential is
already redacted by its builder: only the digests tell such values apart, and they are never shown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Fact = tuple[str, str]  # (digest compared across ranks, value shown in a message)
AGREED_PACKAGES = ("dist_kp", "torch", "torchvision")
_MISSING: Fact = ("", "missing")


class RanksDisagree(RuntimeError):
    """The ranks of one run were started with another config, other data or other versions."""


def version_fingerprint(versions: Mapping[str, str]) -> dict[str, Fact]:
    """The versions every rank must share, from engine.run_state.versions()'s record."""
    return {f"version of {name}": (versions[name], versions[name]) for name in AGREED_PACKAGES}


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _describe(key: str, values: dict[str, tuple[str, list[int]]]) -> str:
    shown = [text for text, _ in values.values()]
    if len(set(shown)) < len(shown):  # redacted values: equal text, other digests
        groups = " and ".join(_ranks(ranks) for _, ranks in values.values())
        return f"{key} differs between {groups} (values not shown)"
    return f"{key} is " + ", ".join(f"{text} on {_ranks(ranks)}" for text, ranks in values.values())


def disagreements(fingerprints: Sequence[Mapping[str, Fact]]) -> list[str]:
    """One line per key whose digest is not the same on every rank (fingerprints in rank order); [] when all agree.

    Each line names the key, and each value with the ranks that hold it, the most common value first.
    """
    lines = []
    for key in sorted(set().union(*fingerprints)):
        values: dict[str, tuple[str, list[int]]] = {}
        for rank, fingerprint in enumerate(fingerprints):
            digest, text = fingerprint.get(key, _MISSING)
            values.setdefault(digest, (text, []))[1].append(rank)
        if len(values) > 1:
            ordered = dict(sorted(values.items(), key=lambda item: (-len(item[1][1]), item[1][1][0])))
            lines.append(_describe(key, ordered))
    return lines


def check_agreement(fingerprints: Sequence[Mapping[str, Fact]]) -> None:
    """Raise RanksDisagree naming every differing key unless all ranks' fingerprints agree."""
    lines = disagreements(fingerprints)
    if lines:
        raise RanksDisagree(f"ranks disagree: {'; '.join(lines)}. Start every rank with the same config, data "
                            "and software")
