"""Does the model work at each site? One verdict per site, by explicit rules (docs/REPORT.md).

Input: a :class:`~protocols.report.StudyReport` (evaluate task) whose sites carry their
payloads and the coordinator's attributed findings (``common.attribution``). Output: a
:class:`~protocols.report.SiteVerdict` per site, a machine code and a plain sentence with the
numbers it rests on; :func:`with_verdicts` stores them in ``report.json``. Called by the
report writer (``files``), the document (``headline``) and the sites CSV.

The measure is the seed's: the share of a site's slices with muscle IoU >= 0.9 (the top bin,
over the slices where muscle is defined). The reference is the internal sites' pooled share
(held-out test patients of the sites that trained the model); for an internal site, the
*other* internal sites only, so that no site is compared with itself. The rules, in order:

1. ``no_result``: the site returned no usable result (failed, timed out, no usable slice...).
2. ``withheld``: the site's release policy withheld its muscle IoU bins.
3. ``too_few_slices``: fewer than :data:`MIN_SLICES` defined slices at the site.
4. ``no_reference``: no internal site to compare with (the only internal site is the reference).
5. ``too_few_slices``: fewer than :data:`MIN_SLICES` slices in the internal reference.
6. ``as_internal``: the site's share is not significantly lower than the reference's:
   two-sided Fisher exact test on the 2x2 table (top bin or not, site vs reference),
   p >= :data:`ALPHA`, or the site's share is at least the reference's.
7. ``explained_by_labelling``: significantly lower, and the site has a label convention that
   can explain it: a systematic muscle finding attributed to the site's convention
   (``site_convention``) that changes at least :data:`MIN_CONVENTION_SHARE` of the muscle area.
8. ``model_underperforms``: significantly lower, and no such convention.

The harmonised share (both masks cut to the protocol's HU ranges) is shown beside the
verdict but does not decide it: a region convention (psoas left out) survives harmonising.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from common.pooling import has_bins, pool_class_scores, usable_payloads
from common.stats import proportions_differ_p, wilson_interval
from protocols.classes import IOU_BINS
from protocols.findings import Finding
from protocols.payloads import ClassScores, EvaluationPayload
from protocols.report import SiteResult, SiteVerdict, StudyReport
from server.report.findings import REGION_TEXT, TISSUE_TEXT, site_findings

#: Fewer defined muscle slices than this (at the site or in the reference): too few to tell.
MIN_SLICES: Final = 5
#: Significance level of the two-sided Fisher exact test, site vs internal reference.
ALPHA: Final = 0.05
#: A convention explains a drop out of the top bin (IoU >= 0.9) when it changes at least this share
#: of the muscle area: the IoU of a slice is at most 1 - that share, half the top bin's headroom.
MIN_CONVENTION_SHARE: Final = 0.05
TOP_BIN: Final = IOU_BINS[0]

STATUS_TEXT: Final[dict[str, str]] = {
    "ok": "no slice scored",
    "no_usable_slices": "no usable slice",
    "failed": "failed",
    "timeout": "no reply in time",
    "refused": "refused",
    "not_selected": "not selected",
    "not_connected": "not connected",
}


@dataclass(frozen=True)
class TopBin:
    """k of n defined slices in the top bin, with the share's 95% Wilson interval."""

    k: int
    n: int

    @property
    def share(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def text(self) -> str:
        """ "8/10 = 80%"."""
        return f"{self.k}/{self.n} = {self.share:.0%}" if self.n else "0/0"


def top_bin(scores: ClassScores | None) -> TopBin | None:
    """The top bin of one class's scores (None when the bins were not sent)."""
    if scores is None or not has_bins(scores):
        return None
    return TopBin(scores.bins[TOP_BIN], sum(scores.bins[b] for b in IOU_BINS))


def reference_sites(site: str, payloads: Mapping[str, EvaluationPayload]) -> list[str]:
    """The internal sites a site is compared with: every internal site that sent its muscle bins,
    except the site itself."""
    return [
        s
        for s, p in payloads.items()
        if p.role == "internal" and s != site and top_bin(p.scores.get("muscle")) is not None
    ]


def reference_top_bin(sites: Sequence[str], payloads: Mapping[str, EvaluationPayload]) -> TopBin | None:
    """The muscle top bin pooled over these sites (counts summed; None without a site)."""
    if not sites:
        return None
    return top_bin(pool_class_scores([payloads[s].scores["muscle"] for s in sites]))


# --------------------------------------------------------------------------- conventions in words


def convention_phrase(f: Finding) -> str:
    """ "leaves psoas out of muscle", "adds the abdominal wall to visceral fat"."""
    tissue, region = TISSUE_TEXT[f.tissue], REGION_TEXT[f.region]
    if f.direction == "site_excludes":
        return f"leaves {region} out of {tissue}"
    return f"adds {region} to {tissue}"


def convention_effect(f: Finding) -> str:
    """What the convention does to the site's numbers: "muscle -12.1 cm², SMI -4.3 cm²/m² per slice;
    2 of 8 sarcopenia calls change" (net area when sent, else the discordant area)."""
    area = f.mean_net_area_cm2 if f.mean_net_area_cm2 is not None else f.mean_area_cm2
    sign = -1.0 if f.direction == "site_excludes" else 1.0
    parts = [f"{TISSUE_TEXT[f.tissue]} {sign * area:+.1f} cm²"]
    if f.smi_shift_mean is not None:
        # smi_shift_mean: the change if the site labelled like the reference; the convention does the opposite
        parts.append(f"SMI {-f.smi_shift_mean:+.1f} cm²/m²")
    text = ", ".join(parts) + " per slice"
    if f.calls_changed is not None and f.calls_known:
        text += f"; {f.calls_changed} of {f.calls_known} sarcopenia calls change"
    return text


def site_conventions(result: SiteResult) -> list[Finding]:
    """The site's findings attributed to its own label convention."""
    return [f for f in site_findings(result) if f.attribution == "site_convention"]


def explaining_conventions(result: SiteResult) -> list[Finding]:
    """The conventions that can explain a lower muscle score (rule 7): systematic, muscle, attributed to
    the site, changing at least :data:`MIN_CONVENTION_SHARE` of the muscle area."""
    return [
        f
        for f in site_conventions(result)
        if f.tissue == "muscle" and f.systematic and f.mean_area_share >= MIN_CONVENTION_SHARE
    ]


# --------------------------------------------------------------------------- the rules


def _comparison(site: TopBin, reference: TopBin, p: float, internal: bool) -> str:
    """ "2/8 = 25% vs 15/18 = 83% internal (Fisher exact p = 0.0077)": two-sided."""
    where = "at the other internal sites" if internal else "internal"
    return f"{site.text()} vs {reference.text()} {where} (Fisher exact p = {p:.2g})"


def site_verdict(result: SiteResult, payloads: Mapping[str, EvaluationPayload]) -> SiteVerdict:
    """One site's verdict by the module's rules; ``payloads``: the study's usable payloads by site."""
    p = payloads.get(result.site)
    if p is None:
        why = STATUS_TEXT.get(result.status, result.status)
        reason = f" ({result.reason})" if result.reason else ""
        return SiteVerdict(code="no_result", sentence=f"no usable result: {why}{reason}")
    here = top_bin(p.scores.get("muscle"))
    if here is None:
        return SiteVerdict(
            code="withheld", sentence="its release policy withheld the muscle IoU bins: nothing to judge"
        )
    if here.n < MIN_SLICES:
        return SiteVerdict(
            code="too_few_slices",
            sentence=f"too few slices to tell ({here.n} with muscle; a verdict needs {MIN_SLICES})",
        )
    sites = reference_sites(result.site, payloads)
    reference = reference_top_bin(sites, payloads)
    if reference is None:
        sentence = (
            f"the only internal site: it is the internal reference ({here.text()})"
            if p.role == "internal"
            else "no internal site to compare with"
        )
        return SiteVerdict(code="no_reference", sentence=sentence)
    if reference.n < MIN_SLICES:
        return SiteVerdict(
            code="too_few_slices",
            sentence=f"too few internal slices to tell ({reference.n} at {', '.join(sites)}; a verdict needs "
            f"{MIN_SLICES})",
        )
    pvalue = proportions_differ_p(here.k, here.n, reference.k, reference.n)
    compared = _comparison(here, reference, pvalue, p.role == "internal")
    if here.share >= reference.share or pvalue >= ALPHA:
        better = here.share > reference.share and pvalue < ALPHA
        head = "performs better than on internal data" if better else "performs as on internal data"
        return SiteVerdict(code="as_internal", sentence=f"{head}: {compared}")
    conventions = explaining_conventions(result)
    if conventions:
        named = "; ".join(f"{convention_phrase(f)} ({convention_effect(f)})" for f in conventions)
        return SiteVerdict(
            code="explained_by_labelling",
            sentence=f"lower score explained by this site's labelling: {named}; {compared}",
        )
    return SiteVerdict(
        code="model_underperforms",
        sentence=f"the model underperforms here; labelling does not explain it: {compared}",
    )


def site_verdicts(report: StudyReport) -> dict[str, SiteVerdict]:
    """Every site's verdict (empty for a comparison of label sets: no model to judge)."""
    if report.task != "evaluate":
        return {}
    payloads = usable_payloads(report)
    return {s.site: site_verdict(s, payloads) for s in report.sites}


def with_verdicts(report: StudyReport) -> StudyReport:
    """The report with each site's ``verdict`` filled (always recomputed: the payloads and findings are
    the record, the verdict is what the report makes of them)."""
    verdicts = site_verdicts(report)
    sites = [s.model_copy(update={"verdict": verdicts.get(s.site)}) for s in report.sites]
    return report.model_copy(update={"sites": sites})


__all__ = [
    "ALPHA",
    "MIN_CONVENTION_SHARE",
    "MIN_SLICES",
    "TopBin",
    "convention_effect",
    "convention_phrase",
    "explaining_conventions",
    "reference_sites",
    "reference_top_bin",
    "site_conventions",
    "site_verdict",
    "site_verdicts",
    "top_bin",
    "with_verdicts",
]
