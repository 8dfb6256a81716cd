"""Convention-aware training targets: a site's labels turned into what the study protocol says.

Input: a site's training slices (HU, canonical label 0-3, pixel spacing) and the study's
:class:`~protocols.protocol.LabelProtocol`. The site's own model-free label audit
(:mod:`common.label_audit`) says which of its labelling conventions differ from the protocol on
a substantial share of its slices (:data:`TRAINING_SHARE`); each such convention becomes one
adjustment of the per-slice targets:

- ``hu_range`` (relabel): the site labels tissue outside the protocol's HU range (IMAT
  included in muscle, outlines over fat, a wider fat range): those pixels become background,
  as the protocol's HU ranges decide them unambiguously;
- ``imat_holes`` (relabel, protocols that count IMAT as muscle): small fat-density holes
  inside the site's muscle become muscle;
- ``boundary`` (relabel, then ignore): contours drawn inside the tissue edge. How far inside is
  measured over the site's training slices (:func:`contour_erosion_px`); the site's muscle is
  regrown by that many pixels through unlabelled muscle-density tissue (tallied as ``contour``),
  and the one-pixel ring beyond it and the wall muscle a tight contour erased are ignored. Where
  no erosion can be measured, the unlabelled band of ``BAND_PX`` pixels around the site's muscle
  is ignored instead: it says nothing about where muscle ends;
- ``psoas`` / ``paraspinal`` (ignore): a muscle group the site leaves out (or adds): the
  unlabelled muscle-density tissue of that body-frame region (``common.discrepancy.frame``),
  or the site's muscle there when the protocol leaves the group out.

Relabelled pixels teach the protocol's class; ignored pixels get :data:`~common.loss.IGNORE_INDEX`
as target and teach nothing (``common.loss``); every other pixel teaches what the site drew.
Called by ``client.site_tasks.run_train`` when ``train.convention-aware`` is on; nothing here
leaves the site except the aggregate :class:`ConventionTally` (shares of labelled pixels).
docs/CONVENTIONS.md gives the reasoning and what cannot be corrected.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Final

import numpy as np
from scipy import ndimage

from common.discrepancy.frame import BONE_HU, REGION_NAMES, BodyFrame, body_frame, fill_small_holes
from common.discrepancy.slice import BAND_PX, SMALL_HOLE_MM2, Key
from common.label_audit import LabelAuditAccumulator, audit_slice
from protocols.findings import LabelAudit
from protocols.keys import CONVENTION_ADJUSTMENTS
from protocols.protocol import ALBERTA, LabelProtocol

if TYPE_CHECKING:
    from common.training import TrainSample

log = logging.getLogger(__name__)

#: Unlabelled tissue down to this many HU below the muscle range counts as part of a muscle
#: group left out (partial volume at its edge), up to bone density.
GROUP_HU_MARGIN: Final = 30.0
#: How far (mm) a muscle group left out may reach past its body-frame region, through
#: unlabelled tissue of its density.
GROUP_GROW_MM: Final = 10.0

_CROSS = ndimage.generate_binary_structure(2, 1)

#: A ring of unlabelled tissue around a site's muscle (one cross step farther out each) is muscle
#: a tight contour left out when at least this share of it, pooled over the site's slices, is of
#: muscle density. Measured on the demo hospitals (12 slices, 128 px), first three rings:
#: protocol-following 0.25-0.28 / 0.46-0.50 / 0.65-0.66 (fat and organs border the muscle edge),
#: IMAT included 0.54 / 0.64 / 0.73, contours drawn 2 px tight 0.82 / 0.99 / 0.55.
RING_MUSCLE_SHARE: Final = 0.75

#: A convention is adjusted for in training when the audit sees it on clearly more than this share
#: of the site's slices (the 95% Wilson interval's lower end), a weaker test than the report's
#: "systematic" (most slices), for two reasons. The audit sees some conventions only where they
#: can be measured: a psoas-excluding demo hospital shows it on 65-80% of its slices (where the
#: psoas is large enough), so at 31 slices (20 of them) "most slices" is not established and its
#: psoas labels taught the model to leave psoas out. And the two errors cost differently in
#: training: ignoring a region where the site did follow the protocol only teaches a little less,
#: while a convention left unadjusted teaches the wrong answer. Sites that follow the protocol
#: show none of these deviations on any slice (the demo's reference hospitals, 12 and 32 slices).
TRAINING_SHARE: Final = 0.25

#: Which audit finding asks for which adjustment.
_ADJUSTMENT_OF: Final[dict[Key, str]] = {
    Key("muscle", "site_includes", "intramuscular_fat"): "hu_range",
    Key("muscle", "site_includes", "boundary"): "hu_range",
    Key("muscle", "site_includes", "other"): "hu_range",
    Key("subcutaneous_fat", "site_includes", "other"): "hu_range",
    Key("visceral_fat", "site_includes", "other"): "hu_range",
    Key("muscle", "site_excludes", "intramuscular_fat"): "imat_holes",
    Key("muscle", "site_excludes", "boundary"): "boundary",
    Key("muscle", "site_excludes", "psoas"): "psoas",
    Key("muscle", "site_includes", "psoas"): "psoas",
    Key("muscle", "site_excludes", "paraspinal"): "paraspinal",
    Key("muscle", "site_includes", "paraspinal"): "paraspinal",
}


def adjustments_for(audit: LabelAudit, declared: Iterable[str] = ()) -> tuple[str, ...]:
    """The adjustments a site's audit asks for: one per kind of deviation seen on clearly more
    than :data:`TRAINING_SHARE` of its slices, plus each ``declared`` one (site.toml
    ``label_conventions``) the audit confirms (:func:`confirms`), in
    :data:`~protocols.keys.CONVENTION_ADJUSTMENTS` order (empty for protocol-following labels)."""
    wanted = {
        _ADJUSTMENT_OF[key]
        for check in audit.checks
        if check.prevalence_low > TRAINING_SHARE  # (a systematic one is above it too)
        and (key := Key(check.tissue, check.direction, check.region)) in _ADJUSTMENT_OF
    }
    wanted |= {name for name in declared if confirms(audit, name)}
    return tuple(a for a in CONVENTION_ADJUSTMENTS if a in wanted)


def confirms(audit: LabelAudit, adjustment: str) -> bool:
    """Whether the audit confirms a convention the site declares: one of its checks that asks for
    this adjustment saw the deviation on some slices and does not say the labels follow the
    protocol there (``conforms``: the share of slices showing it is clearly below one half).

    Weaker than ``systematic`` (the share clearly above one half), which a site with few slices
    cannot reach: a declaration the data bears out is enough. No check (the audit could not
    look, or had too few slices to decide anything) confirms nothing."""
    return any(
        check.n_present > 0 and not check.conforms
        for check in audit.checks
        if _ADJUSTMENT_OF.get(Key(check.tissue, check.direction, check.region)) == adjustment
    )


@dataclass(frozen=True, eq=False)
class SliceTargets:
    """One slice's training target: the label after relabelling, the pixels to ignore, and how
    many pixels each adjustment relabelled or ignored (never sent as such)."""

    label: np.ndarray  #: uint8 canonical 0-3
    ignore: np.ndarray  #: bool, True where the loss ignores the pixel
    changed_px: dict[str, int]


def _in(hu: np.ndarray, rng: tuple[float, float]) -> np.ndarray:
    return (hu >= rng[0]) & (hu <= rng[1])


def _relabel_hu(hu: np.ndarray, label: np.ndarray, protocol: LabelProtocol) -> np.ndarray:
    """Pixels whose class the protocol's HU ranges rule out (IMAT kept when the protocol counts it)."""
    ranges = protocol.hu_ranges
    muscle = (label == 1) & ~_in(hu, ranges.muscle)
    if protocol.imat_in_muscle:
        muscle &= ~_in(hu, ranges.subcutaneous_fat)
    sat = (label == 2) & ~_in(hu, ranges.subcutaneous_fat)
    vat = (label == 3) & ~_in(hu, ranges.visceral_fat)
    return muscle | sat | vat


def _unlabelled_dense(hu: np.ndarray, label: np.ndarray, protocol: LabelProtocol) -> np.ndarray:
    """Background of muscle density (down to GROUP_HU_MARGIN below the range, up to bone)."""
    return (label == 0) & (hu >= protocol.hu_ranges.muscle[0] - GROUP_HU_MARGIN) & (hu < BONE_HU)


def _group_pixels(
    hu: np.ndarray,
    label: np.ndarray,
    frame: BodyFrame,
    group: str,
    protocol: LabelProtocol,
    spacing_mm: float,
) -> np.ndarray:
    """The pixels of body-frame region ``group`` whose site label follows the site, not the protocol."""
    rows, cols = np.nonzero(frame.body)
    region = np.zeros(label.shape, dtype=bool)
    region[rows, cols] = frame.regions(rows, cols) == REGION_NAMES.index(group)
    if not protocol.includes(group):
        return region & (label == 1)  # the site adds a group the protocol leaves out
    unlabelled_dense = _unlabelled_dense(hu, label, protocol)
    seed = region & unlabelled_dense
    # The frame's regions are geometric; a muscle group reaches past them (a psoas wider than
    # the model of the region): grow into the same unlabelled dense tissue, GROUP_GROW_MM at most.
    steps = max(1, round(GROUP_GROW_MM / spacing_mm))
    if seed.any():
        seed = ndimage.binary_dilation(seed, _CROSS, iterations=steps, mask=unlabelled_dense)
    return ndimage.binary_dilation(seed, _CROSS) & (label == 0)  # one pixel of partial volume


def _erased_wall(hu: np.ndarray, label: np.ndarray, protocol: LabelProtocol) -> np.ndarray:
    """Unlabelled muscle-density tissue just inside the site's subcutaneous fat: an abdominal-wall
    muscle thinner than twice a tight contour's erosion, erased altogether (no band reaches it)."""
    unlabelled_muscle = (label == 0) & _in(hu, protocol.hu_ranges.muscle)
    near_fat = ndimage.binary_dilation(label == 2, _CROSS, iterations=BAND_PX) & unlabelled_muscle
    if not near_fat.any():
        return near_fat
    return ndimage.binary_dilation(near_fat, _CROSS, iterations=2 * BAND_PX, mask=unlabelled_muscle)


def adjust_slice(
    hu: np.ndarray,
    spacing_mm: tuple[float, float],
    label: np.ndarray,
    adjustments: Iterable[str],
    protocol: LabelProtocol = ALBERTA,
    *,
    frame: BodyFrame | None = None,
    erosion_px: int = 0,
) -> SliceTargets:
    """Apply ``adjustments`` (names of :data:`~protocols.keys.CONVENTION_ADJUSTMENTS`) to one slice.

    Relabelling comes first; the ignore masks are drawn around the relabelled muscle. The
    region adjustments need the body frame with a spine (built here unless ``frame`` is given);
    on a slice without one they are skipped (and not counted). ``erosion_px``: how many pixels
    inside the edge the site draws its muscle contours (:func:`contour_erosion_px`; 0: not
    measured), for ``boundary``.
    """
    if hu.ndim != 2 or label.shape != hu.shape:
        raise ValueError(f"hu and label must be 2-D of one shape, got {hu.shape} and {label.shape}")
    wanted = tuple(adjustments)
    unknown = sorted(set(wanted) - set(CONVENTION_ADJUSTMENTS))
    if unknown:
        raise ValueError(f"unknown adjustment(s) {unknown}; valid: {', '.join(CONVENTION_ADJUSTMENTS)}")
    out = label.astype(np.uint8, copy=True)
    ignore = np.zeros(label.shape, dtype=bool)
    changed: dict[str, int] = {}
    if "hu_range" in wanted:
        drop = _relabel_hu(hu, out, protocol)
        out[drop] = 0
        changed["hu_range"] = int(np.count_nonzero(drop))
    if "imat_holes" in wanted:
        small = max(int(SMALL_HOLE_MM2 / (spacing_mm[0] * spacing_mm[1])), 1)
        site = out == 1
        holes = fill_small_holes(site, small) & (out == 0) & _in(hu, protocol.hu_ranges.subcutaneous_fat)
        out[holes] = 1
        changed["imat_holes"] = int(np.count_nonzero(holes))
    if "boundary" in wanted:
        wall = _erased_wall(hu, out, protocol)
        if erosion_px > 0:
            # The contour is drawn erosion_px inside the edge: regrow the muscle that far through
            # unlabelled tissue of muscle density (down to GROUP_HU_MARGIN below the range: the
            # edge's partial volume), and ignore only the ring beyond, where the edge itself lies.
            grow = ndimage.binary_dilation(out == 1, _CROSS, iterations=erosion_px) & _unlabelled_dense(
                hu, out, protocol
            )
            grow &= hu <= protocol.hu_ranges.muscle[1]
            out[grow] = 1
            changed["contour"] = int(np.count_nonzero(grow))
            near = ndimage.binary_dilation(out == 1, _CROSS)
        else:
            near = ndimage.binary_dilation(out == 1, _CROSS, iterations=BAND_PX)
        band = ((near & (hu > -500)) | wall) & (out == 0) & ~ignore
        ignore |= band
        changed["boundary"] = int(np.count_nonzero(band))
    groups = [g for g in ("psoas", "paraspinal") if g in wanted]
    if groups:
        if frame is None:
            try:
                frame = body_frame(hu, spacing_mm)
            except ValueError as exc:
                log.info(
                    "convention-aware training: no body frame for a slice (%s); its unlabelled "
                    "muscle-density tissue is ignored",
                    exc,
                )
        for group in groups:
            if frame is not None and frame.spine_found:
                pixels = _group_pixels(hu, out, frame, group, protocol, min(spacing_mm))
            elif protocol.includes(group):
                # the group cannot be placed without the spine, and the site's background may
                # hold it anywhere: no unlabelled tissue of muscle density teaches on this slice
                pixels = _unlabelled_dense(hu, out, protocol)
            else:
                continue  # a group the site adds cannot be told from its other muscle
            pixels &= ~ignore
            ignore |= pixels
            changed[group] = int(np.count_nonzero(pixels))
    return SliceTargets(label=out, ignore=ignore, changed_px=changed)


@dataclass
class ConventionTally:
    """Counts over a site's training slices (pooled, nothing per slice kept): labelled pixels,
    and per adjustment the pixels relabelled or ignored and the slices it was applied to."""

    n_slices: int = 0
    labelled_px: int = 0
    changed_px: dict[str, int] = field(default_factory=dict)
    slices: dict[str, int] = field(default_factory=dict)

    def add(self, label: np.ndarray, targets: SliceTargets) -> None:
        self.n_slices += 1
        self.labelled_px += int(np.count_nonzero(label))
        for name, n in targets.changed_px.items():
            self.changed_px[name] = self.changed_px.get(name, 0) + n
            self.slices[name] = self.slices.get(name, 0) + 1

    def shares(self) -> dict[str, float]:
        """Adjusted pixels per adjustment as a share of the site's labelled pixels (pooled)."""
        total = max(self.labelled_px, 1)
        return {name: n / total for name, n in self.changed_px.items()}


@dataclass(frozen=True)
class ConventionPlan:
    """What convention-aware training did at one site: its audit, the adjustments it asked for,
    the adjusted training and validation samples and the tally over the training slices."""

    audit: LabelAudit
    adjustments: tuple[str, ...]
    train: list[TrainSample]
    val: list[TrainSample]
    tally: ConventionTally
    #: what the site declares (site.toml ``label_conventions``), applied or not
    declared: tuple[str, ...] = ()

    @property
    def unconfirmed(self) -> tuple[str, ...]:
        """Declared conventions the audit did not confirm (not applied)."""
        return tuple(name for name in self.declared if name not in self.adjustments)


def _frame(sample: TrainSample, spacing: tuple[float, float]) -> BodyFrame | None:
    try:
        return body_frame(sample.hu, spacing)
    except ValueError:
        return None


def _spacing(sample: TrainSample, what: str, i: int) -> tuple[float, float]:
    if sample.spacing_mm is None:
        raise ValueError(
            f"{what} sample {i} (group {sample.group!r}) has no pixel spacing; convention-aware "
            "training needs it (client.site_tasks.training_samples sets it from the CT header)"
        )
    return sample.spacing_mm


def contour_erosion_px(samples: Sequence[TrainSample], protocol: LabelProtocol = ALBERTA) -> int:
    """How many pixels inside the tissue edge a site draws its muscle contours, 0 to ``BAND_PX``.

    The rings of unlabelled, non-air tissue around the site's muscle (one cross step each) are
    pooled over ``samples``; the count of leading rings at least :data:`RING_MUSCLE_SHARE` of
    muscle density is the erosion (0: none measurable, as for protocol-following labels).
    """
    dense = np.zeros(BAND_PX)
    total = np.zeros(BAND_PX)
    for sample in samples:
        inside = sample.label == 1
        if not inside.any():
            continue
        muscle_hu = _in(sample.hu, protocol.hu_ranges.muscle)
        tissue = (sample.label == 0) & (sample.hu > -500)
        for ring in range(BAND_PX):
            grown = ndimage.binary_dilation(inside, _CROSS)
            edge = grown & ~inside & tissue
            dense[ring] += np.count_nonzero(edge & muscle_hu)
            total[ring] += np.count_nonzero(edge)
            inside = grown
    shares = dense / np.maximum(total, 1)
    erosion = 0
    while erosion < BAND_PX and total[erosion] and shares[erosion] >= RING_MUSCLE_SHARE:
        erosion += 1
    return erosion


def plan_conventions(
    train: Sequence[TrainSample],
    val: Sequence[TrainSample],
    protocol: LabelProtocol = ALBERTA,
    *,
    min_slices: int = 5,
    declared: Sequence[str] = (),
) -> ConventionPlan:
    """Audit the training slices against ``protocol``, then adjust train and validation samples.

    The audit runs on the training slices only (``min_slices``: below it the audit decides
    nothing and the samples are left as they are). Each body frame is built once per slice.
    ``declared``: the conventions the site declares (site.toml ``label_conventions``), applied
    where the audit confirms them (:func:`adjustments_for`).
    """
    frames = [_frame(s, _spacing(s, "training", i)) for i, s in enumerate(train)]
    audit_sums = LabelAuditAccumulator(protocol=protocol)
    for i, (sample, frame) in enumerate(zip(train, frames, strict=True)):
        audit_sums.add(
            audit_slice(sample.hu, _spacing(sample, "training", i), sample.label, protocol, frame=frame)
        )
    audit = audit_sums.finalise(min_slices=min_slices)
    adjustments = adjustments_for(audit, declared)
    for name in declared:
        if name not in adjustments:
            log.warning(
                "convention-aware training: site.toml declares label convention %r, but the label "
                "audit of %d training slice(s) does not confirm it (no slice shows it, or the labels "
                "follow the protocol there): not applied",
                name,
                audit.n_slices,
            )
    erosion = contour_erosion_px(train, protocol) if "boundary" in adjustments else 0
    if "boundary" in adjustments:
        log.info(
            "convention-aware training: this site's muscle contours are drawn inside the tissue edge; %s",
            f"by {erosion} px, so its muscle labels are grown back {erosion} px to the edge"
            if erosion
            else f"by a width its images do not show, so the {BAND_PX}-px band around them is "
            "left out of training",
        )

    def targets_of(sample: TrainSample, what: str, i: int, frame: BodyFrame | None = None) -> SliceTargets:
        spacing = _spacing(sample, what, i)
        return adjust_slice(
            sample.hu, spacing, sample.label, adjustments, protocol, frame=frame, erosion_px=erosion
        )

    tally = ConventionTally()
    adjusted_train = []
    for i, (sample, frame) in enumerate(zip(train, frames, strict=True)):
        targets = targets_of(sample, "training", i, frame)
        tally.add(sample.label, targets)
        adjusted_train.append(replace(sample, label=targets.label, ignore=targets.ignore))
    adjusted_val = []
    for i, sample in enumerate(val):
        targets = targets_of(sample, "validation", i)
        adjusted_val.append(replace(sample, label=targets.label, ignore=targets.ignore))
    if adjustments:
        log.info(
            "convention-aware training: %s (share of labelled pixels: %s)",
            ", ".join(adjustments),
            {k: round(v, 4) for k, v in tally.shares().items()},
        )
    return ConventionPlan(audit, adjustments, adjusted_train, adjusted_val, tally, tuple(declared))


__all__ = [
    "GROUP_HU_MARGIN",
    "ConventionPlan",
    "ConventionTally",
    "SliceTargets",
    "adjust_slice",
    "adjustments_for",
    "confirms",
    "contour_erosion_px",
    "plan_conventions",
]
