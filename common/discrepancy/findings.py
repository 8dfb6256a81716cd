"""Site aggregation of per-slice discrepancies into named findings.

:class:`DiscrepancyAccumulator` keeps sufficient statistics only (counts and sums), so a
site can add slices one at a time and never holds or sends per-slice values.
:meth:`DiscrepancyAccumulator.finalise` turns them into a
:class:`protocols.payloads.DiscrepancySummary`.

For each (class, direction, region), over the slices where the reference has the class,
the disagreement of a slice is taken *net*: this direction's area minus the opposite
direction's in the same region. A reader (or a model) whose contours wobble both ways has
a net near zero and changing sign; a convention has a net of one sign on slice after slice.

- ``n_present`` / ``prevalence``: slices where the net is present, i.e. exceeds
  ``presence_share`` of the reference class area and ``presence_cm2`` (small floors that
  keep single noisy pixels out; they are not a size threshold), with a 95% Wilson interval;
- ``systematic``: that interval lies above one half: the difference is *consistent*,
  whatever its size. Size is reported separately, never mixed into "systematic":
  ``mean_area_cm2`` / ``mean_area_share`` (this direction's discordant area per slice, 0 on
  slices without it), ``mean_net_area_cm2`` with its 95% t interval, and, for muscle, the
  SMI shift and changed sarcopenia calls (``common.discrepancy.impact``);
- ``density_consistency``: share of the discordant pixels (pooled over slices) whose HU
  lies in the class's range (for ``intramuscular_fat`` this is low by definition: the
  sentence reports the fat-density share).

Findings are reported when their prevalence reaches ``report_prevalence``; systematic
ones come first. ``key_stats`` keeps the sufficient statistics of every kind seen (the
coordinator pools the model's error profile from them). Below ``min_slices`` slices
nothing but ``n_slices`` is released.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.discrepancy.polar import N_ANGLE, N_RADIUS, empty_polar, polar_key
from common.discrepancy.slice import Key, SliceDiscrepancy
from common.stats import mean_interval, wilson_interval
from protocols.classes import TISSUES
from protocols.findings import DIRECTIONS, REGIONS, Finding, KeyStats
from protocols.payloads import DiscrepancySummary, PolarMap
from protocols.protocol import HuRanges

#: A slice shows a kind of disagreement when its net area exceeds this share of the class ...
PRESENCE_SHARE = 0.01
#: ... and this many cm^2: floors against pixel noise, not a size threshold.
PRESENCE_CM2 = 0.25
#: Systematic: the 95% Wilson interval of the share of slices showing it lies above this.
SYSTEMATIC_SHARE_OF_SLICES = 0.5
REPORT_PREVALENCE = 0.2
#: Density share above which discordant tissue "has the class's density".
DENSE = 0.7

SUPPRESSED_KEYS = (
    "discrepancy.findings",
    "discrepancy.region_area_share",
    "discrepancy.key_stats",
    "discrepancy.polar",
)


@dataclass
class _Sums:
    n: int = 0
    n_present: int = 0
    sum_area_cm2: float = 0.0
    sum_share: float = 0.0
    sum_net_share: float = 0.0
    sum_sq_net_share: float = 0.0
    sum_net_cm2: float = 0.0
    sum_sq_net_cm2: float = 0.0
    n_px: int = 0
    n_class_density: int = 0
    n_fat_density: int = 0


def _opposite(direction: str) -> str:
    return "site_includes" if direction == "site_excludes" else "site_excludes"


def is_systematic(n_present: int, n: int) -> bool:
    """Consistent on most slices: the 95% Wilson interval of ``n_present / n`` lies above one half."""
    return n > 0 and wilson_interval(n_present, n)[0] > SYSTEMATIC_SHARE_OF_SLICES


class DiscrepancyAccumulator:
    """Sufficient statistics of a site's per-slice discrepancies (see module docstring)."""

    def __init__(
        self,
        *,
        hu_ranges: HuRanges | None = None,
        presence_share: float = PRESENCE_SHARE,
        presence_cm2: float = PRESENCE_CM2,
        report_prevalence: float = REPORT_PREVALENCE,
        n_angle: int = N_ANGLE,
        n_radius: int = N_RADIUS,
    ) -> None:
        self.hu_ranges = hu_ranges or HuRanges()
        self.presence_share = presence_share
        self.presence_cm2 = presence_cm2
        self.report_prevalence = report_prevalence
        self.n_slices = 0
        self.n_no_spine = 0
        self.n_with_class = dict.fromkeys(TISSUES, 0)
        self.sum_perimeter_px = dict.fromkeys(TISSUES, 0)
        self.sums = {Key(t, d, r): _Sums() for t in TISSUES for d in DIRECTIONS for r in REGIONS}
        self.polar = empty_polar(n_angle, n_radius)

    def add(self, result: SliceDiscrepancy) -> None:
        """Add one slice's analysis."""
        if result.polar.shape != self.polar.shape:
            raise ValueError(
                f"polar map shape {result.polar.shape} differs from the accumulator's {self.polar.shape}"
            )
        self.n_slices += 1
        self.n_no_spine += int(result.spine_found is False)
        self.polar += result.polar
        for tissue in TISSUES:
            area = result.class_area_cm2.get(tissue, 0.0)
            if area <= 0.0:
                continue  # shares are undefined without the class in the reference
            self.n_with_class[tissue] += 1
            self.sum_perimeter_px[tissue] += result.perimeter_px.get(tissue, 0)
            for direction in DIRECTIONS:
                for region in REGIONS:
                    key = Key(tissue, direction, region)
                    sums = self.sums[key]
                    sums.n += 1
                    stat = result.stats.get(key)
                    net_cm2 = (stat.area_cm2 if stat else 0.0) - result.area(
                        tissue, _opposite(direction), region
                    )
                    net = net_cm2 / area
                    sums.sum_net_share += net
                    sums.sum_sq_net_share += net * net
                    sums.sum_net_cm2 += net_cm2
                    sums.sum_sq_net_cm2 += net_cm2 * net_cm2
                    if net > self.presence_share and net_cm2 > self.presence_cm2:
                        sums.n_present += 1
                    if stat is None:
                        continue
                    sums.sum_area_cm2 += stat.area_cm2
                    sums.sum_share += stat.area_cm2 / area
                    sums.n_px += stat.n_px
                    sums.n_class_density += stat.n_class_density
                    sums.n_fat_density += stat.n_fat_density

    def finalise(self, min_slices: int = 5) -> DiscrepancySummary:
        """Aggregate summary; below ``min_slices`` slices only the slice count is released."""
        if self.n_slices < min_slices:
            return DiscrepancySummary(
                n_slices=self.n_slices, findings=[], polar=None, suppressed=list(SUPPRESSED_KEYS)
            )
        findings: list[Finding] = []
        shares: dict[str, float] = {}
        key_stats: dict[str, KeyStats] = {}
        for key, sums in self.sums.items():
            n = self.n_with_class[key.tissue]
            if n == 0 or (sums.n_px == 0 and sums.sum_sq_net_cm2 == 0.0):
                continue
            key_stats[key.text()] = KeyStats(
                n=sums.n,
                n_present=sums.n_present,
                sum_net_share=sums.sum_net_share,
                sum_sq_net_share=sums.sum_sq_net_share,
                sum_net_cm2=sums.sum_net_cm2,
                sum_sq_net_cm2=sums.sum_sq_net_cm2,
            )
            if sums.n_px == 0:
                continue
            shares[key.text()] = sums.sum_share / n
            finding = self._finding(key, sums, n)
            if finding.prevalence >= self.report_prevalence:
                findings.append(finding)
        findings.sort(key=lambda f: (not f.systematic, -f.prevalence, -f.mean_area_cm2))
        n_angle, n_radius = self.polar.shape[2:]
        polar = PolarMap(
            n_angle=n_angle,
            n_radius=n_radius,
            n_slices=self.n_slices,
            maps={
                polar_key(t, d): [[float(v) for v in row] for row in self.polar[i, j]]
                for i, t in enumerate(TISSUES)
                for j, d in enumerate(DIRECTIONS)
            },
        )
        return DiscrepancySummary(
            n_slices=self.n_slices,
            findings=findings,
            region_area_share=shares,
            key_stats=key_stats,
            polar=polar,
            n_no_spine=self.n_no_spine,
        )

    def _finding(self, key: Key, sums: _Sums, n: int) -> Finding:
        low, high = wilson_interval(sums.n_present, n)
        net = mean_interval(n, sums.sum_net_cm2, sums.sum_sq_net_cm2)
        density = sums.n_class_density / sums.n_px
        fat = sums.n_fat_density / sums.n_px
        thickness = None
        if key.region == "boundary" and self.sum_perimeter_px[key.tissue]:
            opposite = self.sums[Key(key.tissue, _opposite(key.direction), "boundary")].n_px
            thickness = max(sums.n_px - opposite, 0) / self.sum_perimeter_px[key.tissue]
        finding = Finding(
            tissue=key.tissue,  # type: ignore[arg-type]
            direction=key.direction,  # type: ignore[arg-type]
            region=key.region,  # type: ignore[arg-type]
            prevalence=sums.n_present / n,
            mean_area_share=sums.sum_share / n,
            mean_area_cm2=sums.sum_area_cm2 / n,
            density_consistency=density,
            systematic=is_systematic(sums.n_present, n),
            n_slices=n,
            sentence="",
            n_present=sums.n_present,
            prevalence_low=low,
            prevalence_high=high,
            mean_net_area_cm2=net.mean,
            net_area_low_cm2=net.low,
            net_area_high_cm2=net.high,
        )
        text = sentence(finding, fat_share=fat, thickness_px=thickness, hu_ranges=self.hu_ranges)
        return finding.model_copy(update={"sentence": text})


TISSUE_TEXT = {"muscle": "muscle", "subcutaneous_fat": "subcutaneous fat", "visceral_fat": "visceral fat"}
WHERE = {
    "psoas": "beside the vertebral body (psoas)",
    "paraspinal": "behind the spine (paraspinal muscles)",
    "abdominal_wall": "in the abdominal wall",
    "other": "away from the contours, outside the named regions",
}
WHAT = {
    "psoas": "psoas",
    "paraspinal": "the paraspinal muscles",
    "abdominal_wall": "abdominal wall muscle",
    "other": "tissue outside the named regions",
}


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def sentence(f: Finding, *, fat_share: float, thickness_px: float | None, hu_ranges: HuRanges) -> str:
    """One plain sentence saying what a finding means."""
    tissue = TISSUE_TEXT[f.tissue]
    lo, hi = getattr(hu_ranges, f.tissue)
    interval = (
        f", 95% CI {_pct(f.prevalence_low)}-{_pct(f.prevalence_high)}"
        if f.prevalence_low is not None and f.prevalence_high is not None
        else ""
    )
    how_much = (
        f"in {_pct(f.prevalence)} of {f.n_slices} slices{interval} (mean {f.mean_area_cm2:.1f} cm², "
        f"{_pct(f.mean_area_share)} of the reference {tissue} area)"
    )
    excludes = f.direction == "site_excludes"
    if f.region == "intramuscular_fat":
        if excludes:
            head = (
                "Fat-density tissue inside muscle is cut out of muscle by this site but not by "
                f"the reference {how_much}"
            )
            meaning = "the reference counts intramuscular fat (IMAT) as muscle, this site does not"
        else:
            head = (
                "Fat-density tissue inside muscle (intramuscular fat) is counted as muscle by "
                f"this site {how_much}"
            )
            meaning = "this site likely includes intramuscular fat (IMAT) in muscle"
        tail = f"{_pct(fat_share)} of it has fat density: {meaning}."
    elif f.region == "boundary":
        way = "tighter" if excludes else "wider"
        band = f", a band about {thickness_px:.1f} px wide" if thickness_px else ""
        head = f"{tissue.capitalize()} contours are drawn {way} than the reference's {how_much}{band}"
        if f.density_consistency <= 1 - DENSE:
            who = "the reference" if excludes else "this site"
            tail = (
                f"only {_pct(f.density_consistency)} of the band has {tissue} density "
                f"({lo:g}..{hi:g} HU): {who} likely labels without that HU range, not a contouring habit."
            )
        else:
            tail = (
                f"{_pct(f.density_consistency)} of the band has {tissue} density: "
                "a contouring habit rather than a definition difference."
            )
    else:
        verb = "is left out by this site" if excludes else "is added by this site"
        head = f"{tissue.capitalize()} {WHERE[f.region]} {verb} {how_much}"
        if f.density_consistency >= DENSE:
            side = "excludes" if excludes else "includes"
            meaning = f"this site's {tissue} definition likely {side} {WHAT[f.region]}"
        elif f.density_consistency <= 1 - DENSE:
            meaning = (
                f"likely an HU-range difference ({tissue} is {lo:g}..{hi:g} HU here) rather than anatomy"
            )
        else:
            meaning = "mixed densities: worth a look"
        tail = f"{_pct(f.density_consistency)} of that tissue has {tissue} density: {meaning}."
    if not f.systematic:
        return f"{head}; not systematic (scattered disagreement). {tail[0].upper()}{tail[1:]}"
    return f"{head}; {tail}"


__all__ = ["DiscrepancyAccumulator", "is_systematic", "sentence"]
