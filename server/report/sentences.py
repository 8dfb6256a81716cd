"""The report's sentences: notes on the sites' payloads, and the few lines the CLI prints when a
study ends (:func:`summary_lines`: each site with its role and n, each pooled group)."""

from __future__ import annotations

from common.pooling import has_bins
from common.release_words import release_sentences
from common.stats import wilson_interval
from protocols import keys
from protocols.classes import IOU_BINS
from protocols.payloads import ClassScores, EvaluationPayload
from protocols.report import StudyReport
from server.report.findings import finding_key, site_findings
from server.report.groups import report_groups
from server.report.render import format_cell
from server.report.tables import SUPPRESSED, percent


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
        notes += [f"{s.site}: {sentence}" for sentence in release_sentences(p)]
    notes += training_release_notes(report)
    return notes


def training_release_notes(report: StudyReport) -> list[str]:
    """Sites whose training replies withheld their validation metrics, were trained with DP-SGD,
    or trained convention-aware (what each adjusted, from its last training reply)."""
    withheld: dict[str, list[int]] = {}
    private: dict[str, list[float]] = {}
    aware: dict[str, dict[str, float]] = {}
    for record in report.training:
        for site, metrics in record.per_site.items():
            if metrics.get(keys.CONVENTION_AWARE):
                aware[site] = dict(metrics)
            if metrics.get(keys.VAL_WITHHELD):
                withheld.setdefault(site, []).append(record.round)
            if keys.DP_EPSILON in metrics:
                private.setdefault(site, []).append(metrics[keys.DP_EPSILON])
    notes = [
        f"{site}: validation metrics withheld in round(s) {', '.join(map(str, rounds))}: "
        "its validation split holds fewer patients or slices than its release policy needs "
        "(min-val-patients / min-val-slices); "
        "its weights were used, its validation loss was not (raise train.val-fraction)."
        for site, rounds in sorted(withheld.items())
    ]
    notes += [
        f"{site}: trained with DP-SGD (its policy's [dp-sgd]): epsilon {max(eps):.3g} per round at most, "
        f"{len(eps)} round(s)."
        for site, eps in sorted(private.items())
    ]
    notes += [convention_note(site, metrics) for site, metrics in sorted(aware.items())]
    return notes


#: How the report names each convention-aware adjustment (protocols.keys.CONVENTION_TALLIES).
_ADJUSTMENT_WORDS = {
    "hu_range": "relabelled by the protocol's HU ranges",
    "imat_holes": "intramuscular-fat holes relabelled muscle",
    "boundary": "tight-contour band ignored",
    "contour": "muscle a tight contour left out regrown to the tissue edge",
    "psoas": "psoas region ignored",
    "paraspinal": "paraspinal region ignored",
}


def convention_note(site: str, metrics: dict[str, float]) -> str:
    """One site's convention-aware training in words, from its (last) training reply."""
    parts, unconfirmed = [], []
    for name in keys.CONVENTION_TALLIES:
        share_key, slices_key = keys.convention_keys(name)
        declared = bool(metrics.get(keys.convention_declared_key(name)))
        if share_key in metrics:
            parts.append(
                f"{_ADJUSTMENT_WORDS[name]} ({metrics[share_key]:.1%} of its labelled pixels, "
                f"{int(metrics.get(slices_key, 0))} training slices"
                + (", declared in its site.toml" if declared else "")
                + ")"
            )
        elif declared:
            unconfirmed.append(name)
    what = (
        "; ".join(parts)
        if parts
        else "no adjustment: its labels follow the protocol as far as its audit can tell"
    )
    if (taught := keys.convention_taught_share(metrics)) < 1.0:
        what += (
            f"; in the federated mean it weighs {taught:.0%} of its training slices "
            "(the share of its labelled pixels that still teach)"
        )
    if unconfirmed:
        what += (
            f"; its site.toml declares {', '.join(unconfirmed)}, which its label audit did not confirm: "
            "not applied"
        )
    if metrics.get(keys.CONVENTION_WITHHELD):
        what += "; an adjustment on fewer slices than its min-slices was withheld"
    return f"{site}: trained convention-aware (train.convention-aware): {what}."


def summary_lines(report: StudyReport) -> list[str]:
    """A few plain-text lines for the CLI to print when a study ends: each site with its role and
    what it was scored on, then each pooled group (internal and external apart)."""
    groups = report_groups(report)
    payloads = {site: p for g in groups for site, p in g.payloads.items()}
    # report.task is the validation's; a study that trained first says so (it is not an evaluate-only run)
    what = f"train + {report.task}" if report.training else report.task
    lines = [
        f"study {report.study_name} (run {report.run_id}): {what}, "
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
            role = f" ({s.role})" if s.role else ""
            lines.append(f"{s.site}{role}: {s.status} - {s.reason or 'no reason given'}")
            continue
        findings = site_findings(s)
        if any(f.attribution is not None for f in findings):
            named = [finding_key(f) for f in findings if f.attribution == "site_convention"]
            tail = f", site conventions: {', '.join(named)}" if named else ""
        else:
            named = [finding_key(f) for f in findings if f.systematic]
            tail = f", systematic: {', '.join(named)}" if named else ""
        lines.append(
            f"{s.site}: ok, {_scored(p)}, muscle IoU >= 0.9 in {_muscle_top_bin(p.scores.get('muscle'))}"
            + tail
        )
        if s.verdict is not None:  # the report's first question: does the model work here?
            lines.append(f"  verdict: {s.verdict.sentence}")
    for g in groups:
        if g.role is None and len(g.payloads) < 2:
            continue
        pooled = g.pooled
        coverage = pooled.coverage("scores.muscle.bins")
        name = f"pooled {g.role}" if g.role else "pooled"
        n = f"{len(pooled.sites)} site{'s' if len(pooled.sites) != 1 else ''}, {pooled.n_used} slices"
        n += f", {pooled.n_groups} patients" if g.role else ""
        muscle = pooled.scores.get("muscle")
        lines.append(
            f"{name} ({n}): muscle IoU >= 0.9 in {_muscle_top_bin(muscle, interval=g.role is not None)}"
            + ("" if coverage.complete else f" ({coverage.describe()})")
        )
    return lines


def _scored(p: EvaluationPayload) -> str:
    """ "internal, 10/12 test-split slices", "external, 8/10 slices", "10/12 slices" (no role)."""
    if p.split == "test":
        counted = f"{p.n_used}/{p.n_in_split if p.n_in_split is not None else '?'} test-split slices"
    else:
        counted = f"{p.n_used}/{p.n_listed} slices"
    return f"{p.role}, {counted}" if p.role else counted


def _muscle_top_bin(muscle: ClassScores | None, interval: bool = False) -> str:
    if muscle is None:
        return "-"
    if not has_bins(muscle):
        return SUPPRESSED
    k, n = muscle.bins[IOU_BINS[0]], sum(muscle.bins.values())
    text = percent(k, n)
    if interval and n:
        low, high = wilson_interval(k, n)
        text = f"{text[:-1]}; 95% CI {low:.0%}-{high:.0%})"
    return text
