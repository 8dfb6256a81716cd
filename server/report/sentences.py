"""The report's sentences: notes on the sites' payloads, the impact and attribution of findings,
and the few lines the CLI prints when a study ends (:func:`summary_lines`)."""

from __future__ import annotations

from collections.abc import Mapping

from common.pooling import (
    attribute_findings,
    finding_key,
    has_bins,
    pool_payloads,
    site_findings,
    usable_payloads,
)
from protocols.classes import IOU_BINS
from protocols.payloads import ClassScores, EvaluationPayload
from protocols.report import StudyReport
from server.report.render import format_cell
from server.report.tables import SUPPRESSED, percent

REGION_TEXT: dict[str, str] = {
    "psoas": "psoas",
    "paraspinal": "the paraspinal muscles",
    "abdominal_wall": "the abdominal wall",
    "boundary": "tissue along the contours",
    "intramuscular_fat": "intramuscular fat",
    "other": "other regions",
}


def test_phrase(task: str) -> str:
    """What "test" is in this study, in words."""
    return "the model's prediction" if task == "evaluate" else "the site's reference masks"


def consistency_notes(report: StudyReport) -> list[str]:
    """Warnings when a site's payload does not match the study (model, cut-offs, HU ranges, suppression)."""
    notes = []
    for s in report.sites:
        p = s.payload
        if p is None:
            continue
        if report.model_hash and p.model_hash and p.model_hash != report.model_hash:
            notes.append(
                f"{s.site} scored model {p.model_hash[:12]}, not the study model {report.model_hash[:12]}."
            )
        if p.sarcopenia is not None and p.sarcopenia.cutoff_set != report.cutoff_set:
            notes.append(f"{s.site} used SMI cut-off set {p.sarcopenia.cutoff_set}, not {report.cutoff_set}.")
        if p.protocol != report.protocol:
            notes.append(
                f"{s.site} applied the label protocol {p.protocol.describe()} (study: the one above)."
            )
        suppressed = [*p.suppressed, *(p.discrepancy.suppressed if p.discrepancy else [])]
        if suppressed:
            notes.append(f"{s.site} suppressed by its release policy: {', '.join(suppressed)}.")
    return notes


def impact_sentences(site: str, payload: EvaluationPayload) -> list[str]:
    """One sentence per systematic finding: what the convention does to this site's areas."""
    reference = "the model's prediction" if payload.task == "evaluate" else "the reference masks"
    cutoffs = payload.sarcopenia.cutoff_set if payload.sarcopenia else "study cut-offs"
    out = []
    for f in site_findings(payload):
        if not f.systematic:
            continue
        tissue = f.tissue.replace("_", " ")
        region = REGION_TEXT[f.region]
        if f.direction == "site_excludes":
            effect = f"leaving out {region} lowers this site's {tissue} area"
        else:
            effect = f"including {region} raises this site's {tissue} area"
        out.append(
            f"{site}: {effect} by {f.mean_area_cm2:.1f} cm² per slice on average "
            f"({f.mean_area_share:.0%} of the {tissue} area in {reference}; seen on {f.prevalence:.0%} of "
            f"{f.n_slices} slices; {f.density_consistency:.0%} of the discordant pixels have {tissue} "
            "density)"
            + (
                f"; labelling like the reference would move its SMI by {f.smi_shift_mean:+.1f} cm²/m² on "
                f"average and change the sarcopenia call ({cutoffs}) "
                f"in {f.calls_changed} of {f.calls_known} slices with a known height."
                if f.smi_shift_mean is not None and f.calls_known
                else "."
            )
        )
    return out


def attribution_lines(payloads: Mapping[str, EvaluationPayload], task: str) -> list[str]:
    """Plain sentences from :func:`attribute_findings` for the report."""
    reference = "the model" if task == "evaluate" else "the reference masks"
    attributed = attribute_findings(payloads)
    n = len(attributed)
    shared = sorted({k for keys in attributed.values() for k, v in keys.items() if v == "shared"})
    lines = []
    for key in shared:
        holders = sorted(s for s, keys in attributed.items() if key in keys)
        lines.append(
            f"{key.replace('/', ' / ')}: systematic at {len(holders)} of {n} sites, "
            f"so it describes {reference} rather than those sites' labels"
            + (" (the model's own convention or error)." if task == "evaluate" else ".")
        )
        for site in sorted(set(attributed) - set(holders)):
            lines.append(
                f"{site}: unlike the other sites it agrees with {reference} on {key.replace('/', ' / ')}: "
                "a convention of this site"
                + (
                    " that the model may have learned from it (see study.exclude-from-training)."
                    if task == "evaluate"
                    else "."
                )
            )
    for site, keys in sorted(attributed.items()):
        own = sorted(k for k, v in keys.items() if v == "site")
        if own:
            lines.append(
                f"{site}: {', '.join(k.replace('/', ' / ') for k in own)}: not shared by most sites, "
                "likely this site's label convention."
            )
    return lines


def summary_lines(report: StudyReport) -> list[str]:
    """A few plain-text lines for the CLI to print when a study ends."""
    payloads = usable_payloads(report)
    lines = [
        f"study {report.study_name} (run {report.run_id}): {report.task}, "
        f"model {(report.model_hash or 'none')[:12]}, SMI cut-offs {report.cutoff_set}"
    ]
    if report.training:
        last = report.training[-1]
        loss = format_cell(last.pooled_val_loss)
        lines.append(
            f"training: {len(report.training)} round(s), last round {last.round} pooled val loss {loss}"
        )
    for s in report.sites:
        p = payloads.get(s.site)
        if p is None:
            lines.append(f"{s.site}: {s.status} - {s.reason or 'no reason given'}")
            continue
        top = _muscle_top_bin(p.scores.get("muscle"))
        systematic = [finding_key(f) for f in site_findings(p) if f.systematic]
        lines.append(
            f"{s.site}: ok, {p.n_used}/{p.n_listed} slices, muscle IoU >= 0.9 in {top}"
            + (f", systematic: {', '.join(systematic)}" if systematic else "")
        )
    if len(payloads) > 1:
        pooled = pool_payloads(payloads)
        coverage = pooled.coverage("scores.muscle.bins")
        lines.append(
            f"pooled ({len(payloads)} sites, {pooled.n_used} slices): muscle IoU >= 0.9 in "
            f"{_muscle_top_bin(pooled.scores.get('muscle'))}"
            + ("" if coverage.complete else f" ({coverage.describe()})")
        )
    return lines


def _muscle_top_bin(muscle: ClassScores | None) -> str:
    if muscle is None:
        return "-"
    if not has_bins(muscle):
        return SUPPRESSED
    return percent(muscle.bins[IOU_BINS[0]], sum(muscle.bins.values()))
