"""Propose a site's ``[labels]`` mapping from its own data: which raw mask value is which tissue.

Each integer value found in a site's masks, *before* any mapping, is described by its
pixels, pooled over slices: how many, their share in each of the label protocol's HU
ranges and their mean HU, and where they lie on the slice: outside the body outline,
under the skin (within a thin band inside the outline), around the spine (the body
frame's psoas and paraspinal regions, ``common.discrepancy.frame``), and touching another
value's pixels. :class:`LabelValueAccumulator` keeps those counts (nothing per slice);
:func:`propose_mapping` names each value's role from them:

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
Everything here stays at the site (it describes the site's own values).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np
from pydantic import Field
from scipy import ndimage

from common.discrepancy.frame import (
    BODY_HU,
    PARASPINAL,
    PSOAS,
    BodyFrame,
    body_frame,
    fill_holes,
    largest_component,
)
from protocols.base import Schema
from protocols.protocol import ALBERTA, LabelProtocol
from protocols.site import LabelMap

log = logging.getLogger(__name__)

Role = Literal["muscle", "subcutaneous_fat", "visceral_fat", "imat", "background"]

#: Fewer pooled pixels than this and a value's role is not guessed.
MIN_PIXELS: Final = 30
#: A value is that density when at least this share of its pixels lie in the range ...
DENSITY_SHARE: Final = 0.5
#: ... and clearly so from this share.
CLEAR_SHARE: Final = 0.7
#: Mostly outside the body outline: a table, air or a marker, not a tissue.
OUTSIDE_SHARE: Final = 0.5
#: The band under the skin: this share of the body's equivalent radius (at least one pixel).
SKIN_FRACTION: Final = 0.06
#: Subcutaneous fat reaches the skin: at least this share of its pixels in that band.
SKIN_SHARE: Final = 0.04
#: IMAT: at least this share of its pixels touches muscle.
IMAT_TOUCH_SHARE: Final = 0.5
#: More distinct values than this in one slice: the rest are pooled for HU but not for touching.
MAX_TOUCH_VALUES: Final = 16
#: More distinct values than this in one mask: not a label mask (an image?); the slice is skipped.
MAX_VALUES: Final = 64
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


class ValueStats(Schema):
    """One raw mask value, pooled over the pixels of every slice it occurs in."""

    value: int
    pixels: int
    slices: int
    share_muscle_hu: float
    share_subcutaneous_fat_hu: float
    share_visceral_fat_hu: float
    mean_hu: float
    share_outside_body: float
    share_under_skin: float
    #: share beside or behind the spine (the body frame's psoas and paraspinal regions), over the
    #: slices where a spine was found; None when it never was
    share_around_spine: float | None = None
    #: other value -> share of this value's pixels that touch it (8-neighbourhood)
    touching: dict[int, float] = Field(default_factory=dict)


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


@dataclass
class _Sums:
    pixels: int = 0
    slices: int = 0
    in_muscle: int = 0
    in_sat: int = 0
    in_vat: int = 0
    hu_sum: float = 0.0
    outside: int = 0
    skin: int = 0
    spine: int = 0
    spine_known: int = 0
    touching: dict[int, int] = field(default_factory=dict)


def _frame(hu: np.ndarray, spacing: tuple[float, float]) -> BodyFrame | None:
    try:
        return body_frame(hu, spacing)
    except ValueError:  # no body at all
        return None
    except Exception:  # the frame only places pixels; the outline alone will do
        log.exception("body frame failed; using the body outline only")
        return None


def _outline(hu: np.ndarray) -> np.ndarray:
    """The body outline as the body frame draws it (HU > -500, largest component, holes filled)."""
    return fill_holes(largest_component(hu > BODY_HU))


def _around_spine(frame: BodyFrame, shape: tuple[int, int]) -> np.ndarray:
    """Pixels in the body frame's psoas or paraspinal region (beside and behind the spine)."""
    rows, cols = np.nonzero(frame.body)
    codes = frame.regions(rows, cols)
    out = np.zeros(shape, dtype=bool)
    out[rows, cols] = (codes == PSOAS) | (codes == PARASPINAL)
    return out


@dataclass
class LabelValueAccumulator:
    """Pooled pixel counts per raw mask value over a site's slices."""

    protocol: LabelProtocol = ALBERTA
    sums: dict[int, _Sums] = field(default_factory=dict)
    n_slices: int = 0
    #: slices left out: a mask with more than MAX_VALUES distinct values, or HU not all finite
    n_skipped: int = 0

    def add(
        self,
        hu: np.ndarray,
        spacing_mm: tuple[float, float],
        raw: np.ndarray,
        *,
        frame: BodyFrame | None = None,
    ) -> None:
        """Add one slice: its HU image, pixel spacing (row, col mm) and raw mask (before mapping).

        ``frame``: the slice's body frame when the caller has it (else it is built here).
        """
        if hu.shape != raw.shape or hu.ndim != 2:
            raise ValueError(f"hu and mask must be 2-D of one shape, got {hu.shape} and {raw.shape}")
        values, inverse = np.unique(raw, return_inverse=True)
        if len(values) > MAX_VALUES or not np.isfinite(hu).all():
            self.n_skipped += 1
            return
        self.n_slices += 1
        inverse = inverse.reshape(raw.shape)
        if not np.any(values != 0):
            return
        spacing = (float(spacing_mm[0]), float(spacing_mm[1]))
        frame = frame if frame is not None else _frame(hu, spacing)
        body = frame.body if frame is not None else _outline(hu)
        spine_found = frame is not None and frame.spine_found
        ranges = self.protocol.hu_ranges
        n = len(values)

        def count(where: np.ndarray) -> np.ndarray:
            return np.bincount(inverse[where], minlength=n)

        totals = np.bincount(inverse.ravel(), minlength=n)
        in_muscle = count((hu >= ranges.muscle[0]) & (hu <= ranges.muscle[1]))
        in_sat = count((hu >= ranges.subcutaneous_fat[0]) & (hu <= ranges.subcutaneous_fat[1]))
        in_vat = count((hu >= ranges.visceral_fat[0]) & (hu <= ranges.visceral_fat[1]))
        hu_sum = np.bincount(inverse.ravel(), weights=hu.ravel().astype(np.float64), minlength=n)
        outside = count(~body)
        skin = count(self._skin_band(body, spacing))
        spine = count(_around_spine(frame, hu.shape)) if frame is not None and spine_found else None
        tracked = [i for i in np.argsort(-totals) if values[i] != 0][:MAX_TOUCH_VALUES]
        touch: dict[int, np.ndarray] = {}
        square = np.ones((3, 3), dtype=bool)
        for i in tracked:
            near = ndimage.binary_dilation(inverse == i, square)
            touch[int(values[i])] = count(near)
        for i, value in enumerate(values.tolist()):
            if value == 0:
                continue
            sums = self.sums.setdefault(int(value), _Sums())
            sums.pixels += int(totals[i])
            sums.slices += 1
            sums.in_muscle += int(in_muscle[i])
            sums.in_sat += int(in_sat[i])
            sums.in_vat += int(in_vat[i])
            sums.hu_sum += float(hu_sum[i])
            sums.outside += int(outside[i])
            sums.skin += int(skin[i])
            if spine is not None:
                sums.spine += int(spine[i])
                sums.spine_known += int(totals[i])
            for other, counts in touch.items():
                if other != value:
                    sums.touching[other] = sums.touching.get(other, 0) + int(counts[i])

    @staticmethod
    def _skin_band(body: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
        if not body.any():
            return body
        radius_mm = math.sqrt(float(body.sum()) * spacing[0] * spacing[1] / math.pi)
        depth = ndimage.distance_transform_edt(np.pad(body, 1), sampling=spacing)[1:-1, 1:-1]
        return body & (depth <= max(SKIN_FRACTION * radius_mm, max(spacing)))

    def finalise(self) -> tuple[ValueStats, ...]:
        out = []
        for value in sorted(self.sums):
            s = self.sums[value]
            n = max(s.pixels, 1)
            out.append(
                ValueStats(
                    value=value,
                    pixels=s.pixels,
                    slices=s.slices,
                    share_muscle_hu=s.in_muscle / n,
                    share_subcutaneous_fat_hu=s.in_sat / n,
                    share_visceral_fat_hu=s.in_vat / n,
                    mean_hu=s.hu_sum / n,
                    share_outside_body=s.outside / n,
                    share_under_skin=s.skin / n,
                    share_around_spine=s.spine / s.spine_known if s.spine_known else None,
                    touching={k: v / n for k, v in sorted(s.touching.items()) if v},
                )
            )
        return tuple(out)


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


def _sentence(value: int, guess: _Guess, prefix: str = "") -> str:
    looks = "looks like" if guess.clear else "may be"
    return f"{prefix}value {value} {looks} {ROLE_TEXT[guess.role]} ({guess.why})"


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
    "LabelValueAccumulator",
    "MappingProposal",
    "MappingVerdict",
    "ValueGuess",
    "ValueStats",
    "labels_toml",
    "mapping_verdict",
    "propose_mapping",
]
