"""Which keypoints a horizontal flip swaps: `data.flip_pairs`, or pairs inferred from the keypoint names.

    flips = training_flip_pairs(cfg.data, meta.keypoint_names, index.source)   # refuses what cannot be right
    flips.permutation(meta.keypoint_names)                                     # for transforms.horizontal_flip

A name looks sided when it follows one of the common conventions, in any case: `left_x`/`right_x`,
`l_x`/`r_x`, `x_left`/`x_right`, `x_l`/`x_r` (separator `_`, `-`, `.` or a space), `leftX`/`rightX`,
`xLeft`/`xRight`, and `LShoulder`/`RShoulder` (a capital L or R before a capitalised word). Its partner
is the same name with the other side. `Nose`, `Neck`, `Rump`, `Lip`, `head_top`, `lower_lip` are not sided.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from dist_kp.config import ConfigError, DataConfig

INFERRED = "inferred from names"
CONFIGURED = "data.flip_pairs"

_SEP = r"[_\-. ]"
# Each pattern marks the side word as group "side"; the first that matches decides.
_SIDED = [
    re.compile(rf"^(?P<side>left|right){_SEP}.", re.IGNORECASE),
    re.compile(rf".{_SEP}(?P<side>left|right)$", re.IGNORECASE),
    re.compile(rf"^(?P<side>l|r){_SEP}.", re.IGNORECASE),
    re.compile(rf".{_SEP}(?P<side>l|r)$", re.IGNORECASE),
    re.compile(r"^(?P<side>[Ll]eft|[Rr]ight)(?=[A-Z0-9])"),  # leftEye, RightHand
    re.compile(r"(?<=[a-z0-9])(?P<side>Left|Right)$"),  # ShoulderLeft (Kinect)
    re.compile(r"^(?P<side>[LR])(?=[A-Z][a-z])"),  # LShoulder, not LED or Lip
]
_OTHER_SIDE = {"left": "right", "right": "left", "l": "r", "r": "l"}


@dataclass(frozen=True)
class Sided:
    """A name that looks like one side of a left/right pair."""

    side: str  # "left" or "right"
    mirror: str  # the same name with the other side


def sided(name: str) -> Sided | None:
    """The side a keypoint name says and its mirror name, or None for a name that says no side."""
    for pattern in _SIDED:
        match = pattern.search(name)
        if match:
            word = match.group("side")
            other = _OTHER_SIDE[word.lower()]
            if word.isupper():
                other = other.upper()
            elif word[0].isupper():
                other = other.capitalize()
            start, end = match.span("side")
            return Sided("left" if word.lower() in ("left", "l") else "right", name[:start] + other + name[end:])
    return None


def infer_flip_pairs(names: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(left, right) pairs of the names that name each other's side, and the sided names with no partner.

    A partner is found by exact name first, then ignoring case (`Left_Eye` with `right_eye`).
    """
    by_casefold: dict[str, str] = {}
    for name in names:
        by_casefold.setdefault(name.casefold(), name)
    present = set(names)
    pairs: list[tuple[str, str]] = []
    paired: set[str] = set()
    unpaired: list[str] = []
    for name in names:
        if name in paired:
            continue
        side = sided(name)
        if side is None:
            continue
        partner = side.mirror if side.mirror in present else by_casefold.get(side.mirror.casefold())
        partner_side = sided(partner) if partner is not None else None
        if partner is None or partner in paired or partner_side is None or partner_side.side == side.side:
            unpaired.append(name)
            continue
        pairs.append((name, partner) if side.side == "left" else (partner, name))
        paired.update((name, partner))
    return pairs, unpaired


def flip_permutation(names: Sequence[str], pairs: Sequence[Sequence[str]]) -> list[int]:
    """Index of each keypoint's mirror image; a keypoint in no pair maps to itself."""
    position = {name: i for i, name in enumerate(names)}
    perm = list(range(len(names)))
    for a, b in pairs:
        perm[position[a]], perm[position[b]] = position[b], position[a]
    return perm


@dataclass(frozen=True)
class FlipPairs:
    """The keypoint pairs a horizontal flip swaps, and where they came from (INFERRED or CONFIGURED)."""

    pairs: tuple[tuple[str, str], ...]
    origin: str

    def permutation(self, names: Sequence[str]) -> list[int]:
        return flip_permutation(names, self.pairs)

    def describe(self) -> str:
        """e.g. 'horizontal flip pairs (inferred from names): LShoulder<->RShoulder, LHip<->RHip'."""
        listed = ", ".join(f"{a}<->{b}" for a, b in self.pairs) or "none (every keypoint maps to itself)"
        return f"horizontal flip pairs ({self.origin}): {listed}"


def training_flip_pairs(data: DataConfig, names: Sequence[str], source: str) -> FlipPairs:
    """The pairs training flips with: data.flip_pairs as given, else the pairs inferred from `names`.

    Refused (ConfigError): a data.flip_pairs name that is not one of `names`; with pairs inferred and
    flips on (data.hflip_prob > 0), a name that looks sided but has no partner, which a flip would
    leave on the wrong side.
    """
    listed = ", ".join(names)
    if data.flip_pairs is not None:
        unknown = [name for pair in data.flip_pairs for name in pair if name not in names]
        if unknown:
            raise ConfigError(f"data.flip_pairs names {', '.join(map(repr, unknown))}, not a keypoint of {source}; "
                              f"its keypoints are: {listed}")
        return FlipPairs(tuple((a, b) for a, b in data.flip_pairs), CONFIGURED)
    pairs, unpaired = infer_flip_pairs(names)
    if unpaired and data.hflip_prob > 0:
        raise ConfigError(
            f"{source}: keypoints that look left/right-sided but have no partner: {', '.join(map(repr, unpaired))} "
            f"(its keypoints: {listed}); a horizontal flip (data.hflip_prob={data.hflip_prob}) would teach them on "
            "the wrong side. Name the pairs in data.flip_pairs (e.g. data.flip_pairs='[[LEye, REye]]', [] for none), "
            "or set data.hflip_prob=0 to train without flips")
    return FlipPairs(tuple(pairs), INFERRED)
