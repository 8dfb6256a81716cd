"""Model-free label audit: a site's labels checked against the study's label protocol.

No model and no reference masks: the CT image itself says what the protocol would label,
at the image's native resolution. Each check names a deviation in the words of a finding
(class, direction, region) and is decided per slice; :class:`LabelAuditAccumulator` keeps
counts and sums only and turns them into a :class:`protocols.findings.LabelAudit`.

The checks (``M`` = the protocol's muscle HU range, ``F`` = its fat range, per pixel):

- ``muscle / site_includes / intramuscular_fat``: fat-density pixels inside the site's
  muscle (more than one pixel from its outline), when the protocol excludes IMAT;
- ``muscle / site_excludes / intramuscular_fat``: fat-density holes inside the site's
  muscle, when the protocol counts IMAT as muscle;
- ``muscle / site_includes / boundary``: pixels on the site's muscle outline outside ``M``
  (contours drawn wider than the tissue, or no HU range applied);
- ``muscle / site_includes / other``: pixels inside the site's muscle that are neither
  muscle nor fat density (bone, contrast, air);
- ``muscle / site_excludes / boundary``: the ring two pixels outside the site's muscle
  still unlabelled muscle-density tissue on most of its length (contours drawn inside the
  tissue edge); a protocol-following contour has fat or another class there;
- ``muscle / site_excludes / psoas`` and ``paraspinal`` (muscle groups the protocol counts):
  muscle-density tissue within ``SPINE_SHELL_MM`` of the spine (the bone the body frame chose
  as the spine, with bone joined to it by a small closing; not ribs, vessels or other dense
  tissue elsewhere), in that region of the body frame, mostly unlabelled and farther than
  ``BAND_PX`` from any labelled muscle (so a tight contour is not mistaken for a muscle left
  out); ``site_includes`` for groups the protocol leaves out;
- ``subcutaneous_fat`` / ``visceral_fat`` ``/ site_includes / other``: pixels labelled with
  the class but outside its HU range.

Thresholds are calibrated on the synthetic hospitals (``common.demo``): reference-convention
labels give 0 for the HU checks, a ring share of about 0.13 (partial volume and organs that
touch muscle) and a spine-region unlabelled share of at most about 0.55 (kidneys, vessels),
against at least 0.95 and 0.70 for the conventions they detect. Checks the audit cannot make
(e.g. abdominal wall muscle left out, fat left out) are listed as ``not_checked``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from scipy import ndimage

from common.discrepancy.findings import SYSTEMATIC_SHARE_OF_SLICES, is_systematic
from common.discrepancy.frame import (
    BONE_HU,
    REGION_NAMES,
    BodyFrame,
    body_frame,
    fill_holes,
    fill_small_holes,
)
from common.discrepancy.slice import BAND_PX, SMALL_HOLE_MM2, Key
from common.metrics import pixel_area_cm2
from common.stats import wilson_interval
from protocols.classes import TISSUES
from protocols.findings import AuditCheck, LabelAudit
from protocols.protocol import ALBERTA, LabelProtocol

log = logging.getLogger(__name__)

#: A pixel-level deviation is present on a slice from this share of the class area ...
MIN_SHARE: Final = 0.002
#: ... and this many pixels (a few noisy pixels are not a convention).
MIN_PX: Final = 3
#: Fat labels outside their HU range: present from this share of the class area.
FAT_MIN_SHARE: Final = 0.001
#: Tight contours: share of the second ring outside the muscle that is unlabelled muscle.
RING_SHARE: Final = 0.5
#: Spine regions: distance from the spine (mm) within which the muscle groups are checked.
SPINE_SHELL_MM: Final = 12.0
#: ... share of that muscle-density tissue left unlabelled for the group to count as left out.
SPINE_UNLABELLED_SHARE: Final = 0.6
#: ... and the least muscle-density area there (cm^2) for the check to apply on a slice.
SPINE_MIN_CM2: Final = 1.0

_CROSS = ndimage.generate_binary_structure(2, 1)
_SQUARE = np.ones((3, 3), dtype=bool)
_SPINE_GROUPS: Final = ("psoas", "paraspinal")

#: The (class, direction, region) kinds the audit cannot check from the image (``not_checked``).
_NOT_CHECKED: Final = (
    Key("muscle", "site_excludes", "abdominal_wall"),
    Key("muscle", "site_includes", "abdominal_wall"),
    Key("muscle", "site_excludes", "other"),
    Key("subcutaneous_fat", "site_excludes", "boundary"),
    Key("subcutaneous_fat", "site_excludes", "other"),
    Key("subcutaneous_fat", "site_includes", "boundary"),
    Key("visceral_fat", "site_excludes", "boundary"),
    Key("visceral_fat", "site_excludes", "other"),
    Key("visceral_fat", "site_includes", "boundary"),
)


@dataclass(frozen=True)
class CheckValue:
    """One check on one slice: the deviating area, its share of the class area, present or not."""

    area_cm2: float
    share: float
    present: bool


@dataclass(frozen=True, eq=False)
class SliceAudit:
    """The audit of one slice (never sent as such): values of the checks that applied."""

    checks: dict[Key, CheckValue]


def _value(n_px: int, class_px: int, px_cm2: float, min_share: float = MIN_SHARE) -> CheckValue:
    share = n_px / class_px if class_px else 0.0
    return CheckValue(n_px * px_cm2, share, n_px >= MIN_PX and share >= min_share)


def _in(hu: np.ndarray, rng: tuple[float, float]) -> np.ndarray:
    return (hu >= rng[0]) & (hu <= rng[1])


def _spine_mask(hu: np.ndarray, frame: BodyFrame) -> np.ndarray:
    """The spine with its marrow (cortical rings filled), as one mask.

    The bone of the body closed over small gaps (so posterior elements split from the
    vertebral body at coarse pixels join it), keeping only the parts that touch the component
    the body frame chose as the spine: ribs, a contrast-filled vessel or other dense tissue
    elsewhere do not widen the psoas and paraspinal checks.
    """
    bone = fill_holes(ndimage.binary_closing(fill_holes((hu > BONE_HU) & frame.body), _SQUARE, iterations=2))
    if frame.spine_mask is None:
        return np.zeros_like(bone)
    labels, _ = ndimage.label(bone)
    touching = np.unique(labels[frame.spine_mask & bone])
    return np.isin(labels, touching[touching > 0]) | frame.spine_mask


def _muscle_checks(
    hu: np.ndarray,
    label: np.ndarray,
    protocol: LabelProtocol,
    px_cm2: float,
    small_hole_px: int,
) -> dict[Key, CheckValue]:
    ranges = protocol.hu_ranges
    muscle_hu, fat_hu = _in(hu, ranges.muscle), _in(hu, ranges.subcutaneous_fat)
    site = label == 1
    n_site = int(np.count_nonzero(site))
    out: dict[Key, CheckValue] = {}
    solid = fill_holes(site)
    interior = ndimage.binary_erosion(solid, _CROSS)
    if protocol.imat_in_muscle:
        holes = fill_small_holes(site, small_hole_px) & ~site & fat_hu
        out[Key("muscle", "site_excludes", "intramuscular_fat")] = _value(
            int(np.count_nonzero(holes)), n_site, px_cm2
        )
    else:
        imat = site & fat_hu & interior
        out[Key("muscle", "site_includes", "intramuscular_fat")] = _value(
            int(np.count_nonzero(imat)), n_site, px_cm2
        )
    edge = site & ~interior & ~muscle_hu
    out[Key("muscle", "site_includes", "boundary")] = _value(int(np.count_nonzero(edge)), n_site, px_cm2)
    odd = site & interior & ~muscle_hu & ~fat_hu
    out[Key("muscle", "site_includes", "other")] = _value(int(np.count_nonzero(odd)), n_site, px_cm2)
    return out


def _ring_check(
    hu: np.ndarray, label: np.ndarray, body: np.ndarray, protocol: LabelProtocol, px_cm2: float
) -> CheckValue | None:
    """Contours drawn inside the tissue edge: unlabelled muscle density two pixels outside."""
    site = label == 1
    one = ndimage.binary_dilation(site, _CROSS)
    two = ndimage.binary_dilation(one, _CROSS)
    ring = two & ~one & body
    n_ring = int(np.count_nonzero(ring))
    if n_ring < MIN_PX:
        return None
    unlabelled_muscle = (label == 0) & _in(hu, protocol.hu_ranges.muscle)
    share = float(np.count_nonzero(ring & unlabelled_muscle)) / n_ring
    band = two & ~site & unlabelled_muscle & body
    return CheckValue(float(np.count_nonzero(band)) * px_cm2, share, share > RING_SHARE)


def _spine_checks(
    hu: np.ndarray,
    label: np.ndarray,
    frame: BodyFrame,
    protocol: LabelProtocol,
    spacing: tuple[float, float],
    px_cm2: float,
) -> dict[Key, CheckValue]:
    """Muscle groups next to the spine left out (or added, for groups the protocol leaves out)."""
    spine = _spine_mask(hu, frame)
    if not spine.any():
        return {}
    distance = ndimage.distance_transform_edt(~spine, sampling=spacing)
    shell = (distance > 0) & (distance <= SPINE_SHELL_MM) & _in(hu, protocol.hu_ranges.muscle) & frame.body
    rows, cols = np.nonzero(shell)
    if rows.size == 0:
        return {}
    codes = frame.regions(rows, cols)
    site = label == 1
    far = ndimage.distance_transform_edt(~site) > BAND_PX if site.any() else np.ones_like(site)
    out: dict[Key, CheckValue] = {}
    for group in _SPINE_GROUPS:
        pick = codes == REGION_NAMES.index(group)
        n = int(np.count_nonzero(pick))
        if n * px_cm2 < SPINE_MIN_CM2:
            continue
        r, c = rows[pick], cols[pick]
        if protocol.includes(group):
            left_out = int(np.count_nonzero(~site[r, c] & far[r, c]))
            share = left_out / n
            out[Key("muscle", "site_excludes", group)] = CheckValue(
                left_out * px_cm2, share, share > SPINE_UNLABELLED_SHARE
            )
        else:
            added = int(np.count_nonzero(site[r, c]))
            share = added / n
            out[Key("muscle", "site_includes", group)] = CheckValue(
                added * px_cm2, share, share > 1.0 - SPINE_UNLABELLED_SHARE
            )
    return out


def _fat_checks(
    hu: np.ndarray, label: np.ndarray, protocol: LabelProtocol, px_cm2: float
) -> dict[Key, CheckValue]:
    out: dict[Key, CheckValue] = {}
    for value, tissue in ((2, "subcutaneous_fat"), (3, "visceral_fat")):
        site = label == value
        n = int(np.count_nonzero(site))
        if n == 0:
            continue
        outside = site & ~_in(hu, getattr(protocol.hu_ranges, tissue))
        out[Key(tissue, "site_includes", "other")] = _value(
            int(np.count_nonzero(outside)), n, px_cm2, FAT_MIN_SHARE
        )
    return out


def audit_slice(
    hu: np.ndarray,
    spacing_mm: tuple[float, float],
    label: np.ndarray,
    protocol: LabelProtocol = ALBERTA,
    *,
    frame: BodyFrame | None = None,
) -> SliceAudit:
    """Check one slice's canonical label (0-3) against ``protocol`` using its HU image."""
    if hu.ndim != 2 or label.shape != hu.shape:
        raise ValueError(f"hu and label must be 2-D of one shape, got {hu.shape} and {label.shape}")
    if len(spacing_mm) != 2 or min(spacing_mm) <= 0:
        raise ValueError(f"spacing_mm must be two positive numbers (row, col), got {spacing_mm}")
    spacing = (float(spacing_mm[0]), float(spacing_mm[1]))
    px_cm2 = pixel_area_cm2(spacing)
    small_hole_px = max(int(SMALL_HOLE_MM2 / (spacing[0] * spacing[1])), 1)
    checks: dict[Key, CheckValue] = {}
    if frame is None:
        try:
            frame = body_frame(hu, spacing)
        except ValueError as exc:
            log.info("label audit: no body frame for this slice (%s); spine checks skipped", exc)
    if np.any(label == 1):
        checks |= _muscle_checks(hu, label, protocol, px_cm2, small_hole_px)
        body = frame.body if frame is not None else hu > -500
        ring = _ring_check(hu, label, body, protocol, px_cm2)
        if ring is not None:
            checks[Key("muscle", "site_excludes", "boundary")] = ring
    if frame is not None and frame.spine_found:
        checks |= _spine_checks(hu, label, frame, protocol, spacing, px_cm2)
    checks |= _fat_checks(hu, label, protocol, px_cm2)
    return SliceAudit(checks=checks)


@dataclass
class _Sums:
    n: int = 0
    n_present: int = 0
    sum_area_cm2: float = 0.0
    sum_share: float = 0.0


@dataclass
class LabelAuditAccumulator:
    """Counts and sums of :class:`SliceAudit` over a site's slices (nothing per slice kept)."""

    protocol: LabelProtocol = ALBERTA
    n_slices: int = 0
    sums: dict[Key, _Sums] = field(default_factory=dict)

    def add(self, result: SliceAudit) -> None:
        self.n_slices += 1
        for key, value in result.checks.items():
            sums = self.sums.setdefault(key, _Sums())
            sums.n += 1
            sums.n_present += int(value.present)
            sums.sum_area_cm2 += value.area_cm2
            sums.sum_share += value.share

    def finalise(self, min_slices: int = 5) -> LabelAudit:
        """The site's audit; below ``min_slices`` slices only the slice count is released."""
        unchecked = sorted(k.text() for k in _NOT_CHECKED)
        if self.n_slices < min_slices:
            return LabelAudit(
                protocol=self.protocol.name,
                n_slices=self.n_slices,
                not_checked=unchecked,
                suppressed=["label_audit.checks"],
            )
        checks = [self._check(key, sums) for key, sums in self.sums.items() if sums.n >= min_slices]
        order = {k: i for i, k in enumerate(TISSUES)}
        checks.sort(key=lambda c: (not c.systematic, order[c.tissue], c.direction, c.region))
        return LabelAudit(
            protocol=self.protocol.name, n_slices=self.n_slices, checks=checks, not_checked=unchecked
        )

    def _check(self, key: Key, sums: _Sums) -> AuditCheck:
        low, high = wilson_interval(sums.n_present, sums.n)
        check = AuditCheck(
            tissue=key.tissue,  # type: ignore[arg-type]
            direction=key.direction,  # type: ignore[arg-type]
            region=key.region,  # type: ignore[arg-type]
            n_slices=sums.n,
            n_present=sums.n_present,
            prevalence=sums.n_present / sums.n,
            prevalence_low=low,
            prevalence_high=high,
            systematic=is_systematic(sums.n_present, sums.n),
            conforms=high < SYSTEMATIC_SHARE_OF_SLICES,
            mean_area_cm2=sums.sum_area_cm2 / sums.n,
            mean_area_share=sums.sum_share / sums.n,
            sentence="",
        )
        return check.model_copy(update={"sentence": audit_sentence(check, self.protocol)})


_WHAT: Final[dict[Key, str]] = {
    Key(
        "muscle", "site_includes", "intramuscular_fat"
    ): "fat-density tissue inside muscle is labelled muscle",
    Key(
        "muscle", "site_excludes", "intramuscular_fat"
    ): "fat-density islands inside muscle are left out of muscle",
    Key("muscle", "site_includes", "boundary"): "muscle outlines run over tissue outside the muscle HU range",
    Key(
        "muscle", "site_includes", "other"
    ): "muscle labels cover tissue that is neither muscle nor fat density",
    Key("muscle", "site_excludes", "boundary"): "muscle contours are drawn inside the muscle-density edge",
    Key(
        "muscle", "site_excludes", "psoas"
    ): "muscle-density tissue beside the vertebral body (psoas) is left out",
    Key(
        "muscle", "site_excludes", "paraspinal"
    ): "muscle-density tissue behind the spine (paraspinals) is left out",
    Key("muscle", "site_includes", "psoas"): "the psoas is labelled muscle",
    Key("muscle", "site_includes", "paraspinal"): "the paraspinal muscles are labelled muscle",
    Key(
        "subcutaneous_fat", "site_includes", "other"
    ): "subcutaneous fat labels cover tissue outside its HU range",
    Key("visceral_fat", "site_includes", "other"): "visceral fat labels cover tissue outside its HU range",
}


def audit_sentence(check: AuditCheck, protocol: LabelProtocol) -> str:
    """One plain sentence: what the audit saw, how consistently, how much, and what it means."""
    key = Key(check.tissue, check.direction, check.region)
    what = _WHAT.get(key, f"{check.tissue} {check.direction} {check.region}")
    share = f"{check.n_present} of {check.n_slices} slices"
    interval = f"95% CI {check.prevalence_low:.0%}-{check.prevalence_high:.0%}"
    size = f"mean {check.mean_area_cm2:.1f} cm² per slice"
    if check.systematic:
        verdict = f"a labelling convention of this site, unlike the {protocol.name} protocol"
    elif check.conforms:
        verdict = f"the labels follow the {protocol.name} protocol here"
    else:
        verdict = "not consistent enough to call a convention"
    return f"{what.capitalize()} on {share} ({interval}; {size}): {verdict}."


__all__ = [
    "CheckValue",
    "LabelAuditAccumulator",
    "SliceAudit",
    "audit_sentence",
    "audit_slice",
]
