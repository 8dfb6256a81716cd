"""Propose a site's ``[labels]`` mapping from its own data: which raw mask value is which tissue.

From each value's pooled statistics (``common.mask_values.ValueStats``),
:func:`propose_mapping` names its role:

- skeletal muscle: most pixels in the muscle HU range;
- subcutaneous fat: fat density, and it reaches the skin (visceral fat never does);
- visceral fat: fat density, away from the skin;
- IMAT (intramuscular fat): fat density, its pixels touching muscle;
- background / unknown: outside the body, neither density, or too few pixels to tell.

IMAT is proposed as muscle when the protocol counts it as muscle, else as background.
The Slice-O-Matic values (1 muscle, 2 IMAT, 5 visceral fat, 7 subcutaneous fat) are
recognised and said so. :func:`mapping_verdict` compares a declared ``[labels]`` with
the proposal and says, in sentences, where the declaration clearly does not fit.
Callers: ``common.check`` (``site check``) and ``client.site_init`` (``site init``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from pydantic import Field

from common.mask_values import ValueStats
from protocols.base import Schema
from protocols.protocol import ALBERTA, LabelProtocol
from protocols.site import LabelMap

Role = Literal["muscle", "subcutaneous_fat", "visceral_fat", "imat", "background"]

#: Fewer pooled pixels than this and a value's role is not guessed.
MIN_PIXELS: Final = 30
#: A value is that density when at least this share of its pixels lie in the range ...
DENSITY_SHARE: Final = 0.5
#: ... and clearly so from this share.
CLEAR_SHARE: Final = 0.7
#: Mostly outside the body outline: a table, air or a marker, not a tissue.
OUTSIDE_SHARE: Final = 0.5
#: Subcutaneous fat reaches the skin: at least this share of its pixels in that band.
SKIN_SHARE: Final = 0.04
#: IMAT: at least this share of its pixels touches muscle.
IMAT_TOUCH_SHARE: Final = 0.5
#: The Slice-O-Matic values.
SLICE_O_MATIC: Final[dict[int, Role]] = {
    1: "muscle",
    2: "imat",
    5: "visceral_fat",
    7: "subcutaneous_fat",
}

ROLE_TEXT: Final[dict[str, str]] = {
    "muscle": "skeletal muscle",
    "subcutaneous_fat": "subcutaneous fat",
    "visceral_fat": "visceral fat",
    "imat": "IMAT, intramuscular fat",
    "background": "background or unknown",
}
_TISSUE_OF: Final[dict[int, str]] = {0: "background", 1: "muscle", 2: "subcutaneous_fat", 3: "visceral_fat"}


class ValueGuess(Schema):
    """What one value looks like, and whether that is clear."""

    value: int
    role: Role
    clear: bool
    evidence: str = Field(description="the numbers the role rests on, in words")
    sentence: str


class MappingProposal(Schema):
    """The mapping that fits the data, value by value, and as ``[labels]`` when complete."""

    guesses: tuple[ValueGuess, ...] = ()
    labels: LabelMap | None = None
    slice_o_matic: bool = False
    note: str = ""

    def toml(self) -> str:
        """The ``[labels]`` table to paste into site.toml ('' when no complete mapping)."""
        return labels_toml(self.labels, self.guesses) if self.labels is not None else ""


class MappingVerdict(Schema):
    """A declared ``[labels]`` against the data: does it fit, and if not, what would."""

    fits: bool
    problems: tuple[str, ...] = ()
    proposal: MappingProposal
    #: the proposal as site.toml lines to paste ('' when the data give no complete mapping)
    toml: str = ""


def _pct(share: float) -> str:
    return f"{share:.0%}"


def _range(rng: tuple[float, float]) -> str:
    return f"{rng[0]:g}..{rng[1]:g} HU"


@dataclass(frozen=True)
class _Guess:
    role: Role
    clear: bool
    why: str


def _density_guess(s: ValueStats, protocol: LabelProtocol) -> _Guess | None:
    """Background / muscle from density and place alone; None for fat density (decided later)."""
    ranges = protocol.hu_ranges
    if s.pixels < MIN_PIXELS:
        return _Guess("background", False, f"only {s.pixels} pixels, too few to tell")
    if s.share_outside_body >= OUTSIDE_SHARE:
        return _Guess(
            "background", True, f"{_pct(s.share_outside_body)} of its pixels lie outside the body outline"
        )
    if s.share_muscle_hu >= DENSITY_SHARE:
        spine = "" if s.share_around_spine is None else f"; {_pct(s.share_around_spine)} around the spine"
        return _Guess(
            "muscle",
            s.share_muscle_hu >= CLEAR_SHARE,
            f"{_pct(s.share_muscle_hu)} of pixels in {_range(ranges.muscle)}, mean {s.mean_hu:.0f} HU{spine}",
        )
    if s.share_subcutaneous_fat_hu >= DENSITY_SHARE:
        return None
    return _Guess(
        "background",
        True,
        f"neither muscle nor fat density (mean {s.mean_hu:.0f} HU; {_pct(s.share_muscle_hu)} in "
        f"{_range(ranges.muscle)}, {_pct(s.share_subcutaneous_fat_hu)} in {_range(ranges.subcutaneous_fat)})",
    )


def _fat_guesses(fat: list[ValueStats], muscle: set[int], muscle_px: int) -> dict[int, _Guess]:
    """Subcutaneous fat reaches the skin; IMAT touches muscle; visceral fat does neither."""

    def touch(s: ValueStats) -> float:
        return min(1.0, sum(s.touching.get(m, 0.0) for m in muscle))

    def fat_text(s: ValueStats) -> str:
        return (
            f"{_pct(s.share_subcutaneous_fat_hu)} of pixels in fat density, mean {s.mean_hu:.0f} HU; "
            f"{_pct(s.share_under_skin)} under the skin, {_pct(touch(s))} touching muscle"
        )

    out: dict[int, _Guess] = {}
    if not fat:
        return out
    skin_first = max(fat, key=lambda s: s.share_under_skin)
    others = []
    for s in fat:
        clear = s.share_subcutaneous_fat_hu >= CLEAR_SHARE
        if s is skin_first and s.share_under_skin >= SKIN_SHARE:
            out[s.value] = _Guess("subcutaneous_fat", clear, fat_text(s))
        elif s.share_under_skin >= max(SKIN_SHARE, 0.5 * skin_first.share_under_skin) and touch(s) < 0.5:
            out[s.value] = _Guess("subcutaneous_fat", False, fat_text(s))
        else:
            others.append(s)
    if len(others) == 1:
        s = others[0]
        imat = touch(s) >= 0.8 and s.pixels < 0.5 * max(muscle_px, 1)
        role: Role = "imat" if imat else "visceral_fat"
        out[s.value] = _Guess(role, s.share_subcutaneous_fat_hu >= CLEAR_SHARE, fat_text(s))
    elif others:
        ordered = sorted(others, key=touch)
        for s in ordered:
            vat = s is ordered[0] or touch(s) < IMAT_TOUCH_SHARE
            clear = s.share_subcutaneous_fat_hu >= CLEAR_SHARE and (
                touch(s) < IMAT_TOUCH_SHARE if vat else touch(s) >= IMAT_TOUCH_SHARE
            )
            out[s.value] = _Guess("visceral_fat" if vat else "imat", clear, fat_text(s))
    return out


def _sentence(value: int, guess: _Guess) -> str:
    looks = "looks like" if guess.clear else "may be"
    return f"value {value} {looks} {ROLE_TEXT[guess.role]} ({guess.why})"


def propose_mapping(stats: tuple[ValueStats, ...], protocol: LabelProtocol = ALBERTA) -> MappingProposal:
    """Each value's role from its pooled statistics, and the ``[labels]`` that follows.

    IMAT goes to muscle when ``protocol`` counts intramuscular fat as muscle, else to
    background. ``labels`` is None when some study tissue has no value that looks like it.
    """
    guesses: dict[int, _Guess] = {}
    fat: list[ValueStats] = []
    for s in stats:
        guess = _density_guess(s, protocol)
        if guess is None:
            fat.append(s)
        else:
            guesses[s.value] = guess
    muscle = {v for v, g in guesses.items() if g.role == "muscle"}
    muscle_px = sum(s.pixels for s in stats if s.value in muscle)
    guesses |= _fat_guesses(fat, muscle, muscle_px)

    seen = {s.value for s in stats}
    slice_o_matic = {1, 5, 7} <= seen <= set(SLICE_O_MATIC)
    notes: list[str] = []
    if slice_o_matic:
        differ = sorted(v for v, g in guesses.items() if g.clear and g.role != SLICE_O_MATIC[v])
        for v, g in list(guesses.items()):
            if not g.clear and g.role != SLICE_O_MATIC[v]:
                guesses[v] = _Guess(SLICE_O_MATIC[v], False, g.why + "; the Slice-O-Matic value")
        notes.append(
            "These are the Slice-O-Matic values (1 muscle, 2 IMAT, 5 visceral fat, 7 subcutaneous fat)"
            + (
                f", but the data disagree for value(s) {', '.join(map(str, differ))}."
                if differ
                else " and the data agree."
            )
        )
    out = tuple(
        ValueGuess(value=v, role=g.role, clear=g.clear, evidence=g.why, sentence=_sentence(v, g))
        for v, g in sorted(guesses.items())
    )
    labels, missing = _labels(out, protocol)
    if missing:
        notes.append(
            f"No value looks like {' or '.join(ROLE_TEXT[m] for m in missing)}: no complete mapping."
        )
    return MappingProposal(guesses=out, labels=labels, slice_o_matic=slice_o_matic, note=" ".join(notes))


def _labels(guesses: tuple[ValueGuess, ...], protocol: LabelProtocol) -> tuple[LabelMap | None, list[str]]:
    by_role: dict[str, list[int]] = {
        "muscle": [],
        "subcutaneous_fat": [],
        "visceral_fat": [],
        "background": [],
    }
    for g in guesses:
        role = g.role if g.role != "imat" else ("muscle" if protocol.imat_in_muscle else "background")
        by_role[role].append(g.value)
    missing = [r for r in ("muscle", "subcutaneous_fat", "visceral_fat") if not by_role[r]]
    if missing:
        return None, missing
    return LabelMap(**by_role), []


def labels_toml(labels: LabelMap, guesses: tuple[ValueGuess, ...] = ()) -> str:
    """``[labels]`` lines for site.toml; background values say what they looked like."""
    role = {g.value: g.role for g in guesses}

    def values(items: list[int]) -> str:
        return "[" + ", ".join(map(str, items)) + "]"

    lines = [
        "[labels]",
        f"muscle = {values(labels.muscle)}",
        f"subcutaneous_fat = {values(labels.subcutaneous_fat)}",
        f"visceral_fat = {values(labels.visceral_fat)}",
    ]
    if labels.background:
        what = ", ".join(f"{v}: {ROLE_TEXT[role.get(v, 'background')]}" for v in labels.background)
        lines.append(f"background = {values(labels.background)}  # {what}")
    return "\n".join(lines) + "\n"


def mapping_verdict(declared: LabelMap, proposal: MappingProposal) -> MappingVerdict:
    """Whether ``declared`` fits the data: each clear guess against the class it was declared as.

    A value that clearly looks like one study tissue but is declared as another, or clearly
    IMAT but declared as a fat class, is a problem. IMAT declared as muscle or background is
    a convention, not a problem; a value declared nowhere is ``site check``'s own exclusion.
    The mapping does not fit when there is a problem and the data give a complete mapping.
    """
    lookup = declared.lookup()
    problems = []
    for g in proposal.guesses:
        if not g.clear or g.value not in lookup:
            continue
        declared_as = _TISSUE_OF[lookup[g.value]]
        if declared_as == "background" or declared_as == g.role:
            continue
        if g.role == "imat" and declared_as == "muscle":
            continue
        if g.role == "background":
            continue
        problems.append(
            f"value {g.value} is declared {declared_as} but looks like {ROLE_TEXT[g.role]} ({g.evidence})"
        )
    fits = not problems or proposal.labels is None or proposal.labels.lookup() == lookup
    return MappingVerdict(fits=fits, problems=tuple(problems), proposal=proposal, toml=proposal.toml())


__all__ = [
    "SLICE_O_MATIC",
    "MappingProposal",
    "MappingVerdict",
    "ValueGuess",
    "labels_toml",
    "mapping_verdict",
    "propose_mapping",
]
