"""The study report: pooling across sites, the seed's tables, and report.json/.csv/.md/.html.

Everything here is computed from the sites' payloads (aggregates) only. Pooling uses
sufficient statistics and every pooled number names its pooling:

- IoU-bin counts, undefined counts, intersection/union pixels and sarcopenia calls *add*
  across sites (``common.evaluation.pool_class_scores``).
- Mean and sd of per-slice IoU/Dice and of area/SMI differences are exact over the
  concatenated slices of all sites (from n, mean, sd or n, sum, sum of squares);
  Bland-Altman limits are mean +- 1.96 sd of the pooled differences.
- Medians and quartiles cannot be pooled from summaries: the pooled row says "not poolable".

``write_report`` writes ``report.json`` (the record), ``tables/*.csv``, ``figures/*.png``,
``report.md`` and a self-contained ``report.html`` (inline CSS, figures as base64 PNG).
"""

from __future__ import annotations

import base64
import html
import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.cutoffs import get_cutoff_set
from common.evaluation import pool_area_agreement, pool_class_scores, pool_smi_agreement
from protocols.classes import IOU_BINS, METRIC_CLASSES, SEED_COLUMN, TISSUES
from protocols.findings import DIRECTIONS, REGIONS, Finding
from protocols.payloads import (
    AreaAgreement,
    ClassScores,
    EvaluationPayload,
    SarcopeniaConfusion,
    SmiAgreement,
)
from protocols.report import RoundRecord, StudyReport
from server import figures

log = logging.getLogger(__name__)

POOLED = "pooled"
NOT_POOLABLE = "not poolable"
RATIO_COLUMN = "ratio"
UNDEFINED_ROW = "undefined"
LOA_Z = 1.96
POOLING_SLICES = "over slices of all sites (exact from n, sum, sum of squares)"
REGION_TEXT: dict[str, str] = {
    "psoas": "psoas",
    "paraspinal": "the paraspinal muscles",
    "abdominal_wall": "the abdominal wall",
    "boundary": "tissue along the contours",
    "intramuscular_fat": "intramuscular fat",
    "other": "other regions",
}


# --------------------------------------------------------------------------- pooling


@dataclass(frozen=True)
class Pooled:
    """The study pooled over the sites with a usable payload (see the module docstring)."""

    sites: tuple[str, ...]
    n_listed: int
    n_used: int
    n_groups: int
    excluded: dict[str, int]
    scores: dict[str, ClassScores]
    areas: dict[str, AreaAgreement]
    smi: SmiAgreement | None
    sarcopenia: SarcopeniaConfusion | None
    #: Only when every pooled site sent harmonised scores (else a partial pool would mislead).
    harmonised_scores: dict[str, ClassScores] | None


def usable_payloads(report: StudyReport) -> dict[str, EvaluationPayload]:
    """Site -> payload for the sites whose status is ok and that scored at least one slice."""
    return {
        s.site: s.payload
        for s in report.sites
        if s.status == "ok" and s.payload is not None and s.payload.n_used > 0
    }


def pool_sarcopenia(parts: Sequence[SarcopeniaConfusion]) -> SarcopeniaConfusion | None:
    """Add sarcopenia confusion counts; all parts must use the same cut-off set."""
    if not parts:
        return None
    sets = sorted({p.cutoff_set for p in parts})
    if len(sets) > 1:
        raise ValueError(f"cannot pool sarcopenia calls made with different cut-off sets: {sets}")
    return SarcopeniaConfusion(
        cutoff_set=sets[0],
        both_sarcopenic=sum(p.both_sarcopenic for p in parts),
        label_only=sum(p.label_only for p in parts),
        test_only=sum(p.test_only for p in parts),
        neither=sum(p.neither for p in parts),
        unknown=sum(p.unknown for p in parts),
    )


def pool_payloads(payloads: Mapping[str, EvaluationPayload]) -> Pooled:
    """Pool the payloads of several sites (site -> payload) into one :class:`Pooled`."""
    parts = list(payloads.values())
    excluded: dict[str, int] = {}
    for p in parts:
        for reason, count in p.excluded.items():
            excluded[reason] = excluded.get(reason, 0) + count
    smi_parts = [p.smi for p in parts if p.smi is not None]
    sarc = [p.sarcopenia for p in parts if p.sarcopenia is not None]
    sets = {s.cutoff_set for s in sarc}
    harmonised = None
    if parts and all(p.harmonised_scores for p in parts):
        harmonised = {
            c: pool_class_scores([p.harmonised_scores[c] for p in parts])  # type: ignore[index]
            for c in METRIC_CLASSES
            if all(c in p.harmonised_scores for p in parts)  # type: ignore[operator]
        }
    return Pooled(
        sites=tuple(payloads),
        n_listed=sum(p.n_listed for p in parts),
        n_used=sum(p.n_used for p in parts),
        n_groups=sum(p.n_groups for p in parts),
        excluded=excluded,
        scores={c: pool_class_scores([p.scores[c] for p in parts if c in p.scores]) for c in METRIC_CLASSES},
        areas={t: pool_area_agreement([p.areas[t] for p in parts if t in p.areas]) for t in TISSUES},
        smi=pool_smi_agreement(smi_parts) if smi_parts else None,
        sarcopenia=pool_sarcopenia(sarc) if len(sets) == 1 else None,
        harmonised_scores=harmonised,
    )


def limits_of_agreement(mean: float | None, sd: float | None) -> tuple[float, float] | None:
    """Bland-Altman limits of agreement, mean +- 1.96 sd (None without an sd)."""
    if mean is None or sd is None:
        return None
    return mean - LOA_Z * sd, mean + LOA_Z * sd


# --------------------------------------------------------------------------- tables


def _percent(part: int, whole: int) -> str:
    return f"{part}/{whole} ({math.floor(100 * part / whole + 0.5)}%)" if whole else f"{part}/0 (-)"


def seed_table(
    scores: Mapping[str, ClassScores], n_slices: int, classes: Sequence[str] = METRIC_CLASSES
) -> pd.DataFrame:
    """The seed paper's Table 2 layout: IoU bins x M, S, V, MSV, plus the ratio column.

    Rows are the four bins and an ``undefined`` row (slices where the class is empty in both
    masks). The seed writes the ratio as row total / (4 x slices), which assumes every class
    is defined on every slice; here the denominator of a bin row is the number of *defined*
    slice-class cells (sum of the four bins over the columns), so the bin rows still add up
    to 100%. The ``undefined`` row's ratio is over all slice-class cells (columns x slices).
    A bin a site did not send (suppressed by its policy) is shown as missing, never as 0.
    """
    columns = [SEED_COLUMN[c] for c in classes]
    counts: dict[str, list[int | None]] = {}
    for cls, column in zip(classes, columns, strict=True):
        s = scores.get(cls)
        counts[column] = [s.bins.get(b) if s else None for b in IOU_BINS] + [s.undefined if s else None]
        if (
            s is not None
            and s.bins.keys() >= set(IOU_BINS)
            and sum(s.bins.values()) + s.undefined != n_slices
        ):
            log.warning(
                "class %s: %d binned + %d undefined slices, expected %d",
                cls,
                sum(s.bins.values()),
                s.undefined,
                n_slices,
            )
    frame = pd.DataFrame(counts, index=pd.Index([*IOU_BINS, UNDEFINED_ROW], name="IoU"), dtype="Int64")
    complete = not frame.isna().to_numpy().any()
    defined = int(frame.loc[list(IOU_BINS)].sum().sum()) if complete else 0
    ratios = []
    for row in frame.index:
        if frame.loc[row].isna().any() or not complete:
            ratios.append("suppressed")
            continue
        total = int(frame.loc[row].sum())
        ratios.append(_percent(total, len(columns) * n_slices if row == UNDEFINED_ROW else defined))
    frame[RATIO_COLUMN] = ratios
    return frame


def iou_summary_table(columns: Mapping[str, Mapping[str, ClassScores]]) -> pd.DataFrame:
    """Per site (and pooled) and class: per-slice IoU/Dice summary and IoU pooled over pixels."""
    rows = []
    for label, scores in columns.items():
        for cls in METRIC_CLASSES:
            if cls not in scores:
                continue
            s = scores[cls]
            pooled = label == POOLED
            rows.append(
                {
                    "site": label,
                    "class": SEED_COLUMN[cls],
                    "n_defined": s.iou.n,
                    "iou_mean_over_slices": s.iou.mean,
                    "iou_sd": s.iou.sd,
                    "iou_median": NOT_POOLABLE if pooled and s.iou.median is None else s.iou.median,
                    "iou_q1": NOT_POOLABLE if pooled and s.iou.q1 is None else s.iou.q1,
                    "iou_q3": NOT_POOLABLE if pooled and s.iou.q3 is None else s.iou.q3,
                    "iou_pooled_over_pixels": s.intersection_px / s.union_px if s.union_px else None,
                    "dice_mean_over_slices": s.dice.mean,
                }
            )
    return pd.DataFrame(rows)


def area_table(rows: Mapping[str, Mapping[str, AreaAgreement]]) -> pd.DataFrame:
    """Area agreement per site (and pooled) and tissue, with Bland-Altman limits (test - label, cm^2)."""
    out = []
    for label, areas in rows.items():
        for tissue in TISSUES:
            if tissue not in areas:
                continue
            a = areas[tissue]
            loa = limits_of_agreement(a.mean_diff_cm2, a.sd_diff_cm2)
            out.append(
                {
                    "site": label,
                    "tissue": tissue,
                    "n": a.n,
                    "mean_label_cm2": a.mean_label_cm2,
                    "mean_test_cm2": a.mean_test_cm2,
                    "mean_diff_cm2": a.mean_diff_cm2,
                    "sd_diff_cm2": a.sd_diff_cm2,
                    "loa_low_cm2": loa[0] if loa else None,
                    "loa_high_cm2": loa[1] if loa else None,
                    "mean_hu_label": a.mean_hu_label,
                    "mean_hu_test": a.mean_hu_test,
                    "pooling": POOLING_SLICES if label == POOLED else "over this site's slices",
                }
            )
    return pd.DataFrame(out)


def smi_table(rows: Mapping[str, SmiAgreement | None]) -> pd.DataFrame:
    """SMI agreement (cm^2/m^2, test - label) per site and pooled, with limits of agreement."""
    out = []
    for label, s in rows.items():
        if s is None:
            continue
        loa = limits_of_agreement(s.mean_diff, s.sd_diff)
        out.append(
            {
                "site": label,
                "n": s.n,
                "mean_label": s.mean_label,
                "mean_test": s.mean_test,
                "mean_diff": s.mean_diff,
                "sd_diff": s.sd_diff,
                "loa_low": loa[0] if loa else None,
                "loa_high": loa[1] if loa else None,
                "pooling": POOLING_SLICES if label == POOLED else "over this site's slices",
            }
        )
    return pd.DataFrame(out)


def sarcopenia_table(rows: Mapping[str, SarcopeniaConfusion | None]) -> pd.DataFrame:
    """Sarcopenia calls (label = truth) per site and pooled (counts of slices add)."""
    out = []
    for label, c in rows.items():
        if c is None:
            continue
        known = c.both_sarcopenic + c.label_only + c.test_only + c.neither
        positives, negatives = c.both_sarcopenic + c.label_only, c.neither + c.test_only
        out.append(
            {
                "site": label,
                "cutoff_set": c.cutoff_set,
                "both_sarcopenic": c.both_sarcopenic,
                "label_only": c.label_only,
                "test_only": c.test_only,
                "neither": c.neither,
                "unknown": c.unknown,
                "agreement": (c.both_sarcopenic + c.neither) / known if known else None,
                "sensitivity": c.both_sarcopenic / positives if positives else None,
                "specificity": c.neither / negatives if negatives else None,
            }
        )
    return pd.DataFrame(out)


def sites_table(report: StudyReport) -> pd.DataFrame:
    """One row per site: status and reason, dataset fingerprint, slice counts, exclusions."""
    rows = []
    for s in report.sites:
        p = s.payload
        rows.append(
            {
                "site": s.site,
                # Flower node ids are unsigned 64-bit: keep them as text, not int64.
                "node_id": str(s.node_id) if s.node_id is not None else None,
                "status": s.status,
                "reason": s.reason or ("" if s.status == "ok" else "no reason given"),
                "dataset_fingerprint": p.dataset_fingerprint if p else None,
                "model_hash": p.model_hash if p else None,
                "n_listed": p.n_listed if p else None,
                "n_used": p.n_used if p else None,
                "n_patients": p.n_groups if p else None,
                "excluded": "; ".join(f"{k}: {v}" for k, v in sorted(p.excluded.items())) if p else None,
            }
        )
    columns = ["site", "node_id", "status", "reason", "dataset_fingerprint", "model_hash"]
    columns += ["n_listed", "n_used", "n_patients", "excluded"]
    frame = pd.DataFrame(rows, columns=columns)  # a training-only study has no site rows
    counts = ["n_listed", "n_used", "n_patients"]
    frame[counts] = frame[counts].astype("Int64")
    return frame


def site_findings(payload: EvaluationPayload) -> list[Finding]:
    """The site's findings (from its discrepancy summary when present), one per class/direction/region."""
    found = payload.discrepancy.findings if payload.discrepancy else payload.findings
    unique: dict[tuple[str, str, str], Finding] = {}
    for f in [*found, *payload.findings]:
        unique.setdefault((f.tissue, f.direction, f.region), f)
    return list(unique.values())


def finding_key(f: Finding) -> str:
    return f"{f.tissue}/{f.direction}/{f.region}"


def _key_order(key: str) -> tuple[int, int, int]:
    tissue, direction, region = key.split("/")
    return TISSUES.index(tissue), DIRECTIONS.index(direction), REGIONS.index(region)


def findings_matrix(payloads: Mapping[str, EvaluationPayload]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sites x "class/direction/region": prevalence (NaN = not reported) and systematic flags."""
    per_site = {site: {finding_key(f): f for f in site_findings(p)} for site, p in payloads.items()}
    per_site = {site: found for site, found in per_site.items() if found}
    columns = sorted({k for found in per_site.values() for k in found}, key=_key_order)
    prevalence = pd.DataFrame(
        [[found[k].prevalence if k in found else math.nan for k in columns] for found in per_site.values()],
        index=pd.Index(list(per_site), name="site"),
        columns=columns,
        dtype=float,
    )
    systematic = pd.DataFrame(
        [[bool(k in found and found[k].systematic) for k in columns] for found in per_site.values()],
        index=prevalence.index,
        columns=columns,
        dtype=bool,
    )
    return prevalence, systematic


def findings_table(payloads: Mapping[str, EvaluationPayload]) -> pd.DataFrame:
    """Every finding of every site, long format (the CSV behind the matrix)."""
    rows = [
        {"site": site, **f.model_dump(mode="json", by_alias=True)}
        for site, p in payloads.items()
        for f in site_findings(p)
    ]
    return pd.DataFrame(rows)


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


def harmonised_table(raw: Mapping[str, ClassScores], harmonised: Mapping[str, ClassScores]) -> pd.DataFrame:
    """Muscle IoU bins before and after harmonised rescoring (both masks cut to the HU ranges)."""
    rows = {}
    for name, scores in (("M raw", raw.get("muscle")), ("M harmonised", harmonised.get("muscle"))):
        if scores is not None:
            rows[name] = [scores.bins.get(b) for b in IOU_BINS] + [scores.undefined]
    return pd.DataFrame(rows, index=pd.Index([*IOU_BINS, UNDEFINED_ROW], name="IoU"), dtype="Int64")


def training_table(rounds: Sequence[RoundRecord]) -> pd.DataFrame:
    """One row per training round."""
    return pd.DataFrame(
        [
            {
                "round": r.round,
                "status": r.status,
                "sites_replied": ", ".join(r.sites_replied),
                "sites_failed": "; ".join(f"{s}: {why}" for s, why in sorted(r.sites_failed.items())),
                "pooled_val_loss": r.pooled_val_loss,
                "pooled_val_iou_muscle": r.pooled_val_iou.get("muscle"),
                "weights_hash": (r.weights_hash or "")[:12],
                "seconds": r.seconds,
            }
            for r in rounds
        ]
    )


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
        if p.hu_ranges != report.hu_ranges:
            notes.append(
                f"{s.site} used HU ranges {p.hu_ranges.model_dump()} "
                f"(study: {report.hu_ranges.model_dump()})."
            )
        suppressed = [*p.suppressed, *(p.discrepancy.suppressed if p.discrepancy else [])]
        if suppressed:
            notes.append(f"{s.site} suppressed by its release policy: {', '.join(suppressed)}.")
    return notes


# --------------------------------------------------------------------------- document


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Table:
    frame: pd.DataFrame
    caption: str = ""
    index: bool = False
    #: Same shape as ``frame``: True cells are emphasised (systematic findings).
    highlight: pd.DataFrame | None = None


@dataclass(frozen=True)
class Image:
    name: str
    png: bytes
    caption: str


Block = Heading | Text | Bullets | Table | Image


def _test_word(task: str) -> str:
    return "the model's prediction" if task == "evaluate" else "the site's reference masks"


def _header(report: StudyReport, n_usable: int) -> list[Block]:
    cut = get_cutoff_set(report.cutoff_set)
    men = f"men < {cut.men}" + (f" (< {cut.men_bmi25} if BMI >= 25)" if cut.men_bmi25 is not None else "")
    hu = report.hu_ranges
    spec = ", ".join(f"{k}={v}" for k, v in (report.model_spec or {}).items()) or "none (no model)"
    return [
        Heading(f"Study report: {report.study_name}", 1),
        Bullets(
            (
                f"Run {report.run_id}, created {report.created}, sarcofed {report.sarcofed_version}, "
                f"report schema {report.schema_version}.",
                f"Task: {report.task} (test = {_test_word(report.task)}; label = the site's labels, "
                "taken as truth; differences are test - label).",
                f"Model hash: {report.model_hash or 'none'}; model: {spec}.",
                f"SMI cut-off set: {cut.name.value} ({men}, women < {cut.women} cm²/m²; {cut.note}). "
                f"{cut.citation}",
                f"HU ranges: muscle {hu.muscle[0]:g}..{hu.muscle[1]:g}, subcutaneous fat "
                f"{hu.subcutaneous_fat[0]:g}..{hu.subcutaneous_fat[1]:g}, visceral fat "
                f"{hu.visceral_fat[0]:g}..{hu.visceral_fat[1]:g}.",
                f"Sites: {n_usable} of {len(report.sites)} returned a usable result.",
            )
        ),
    ]


def _sites_section(report: StudyReport) -> list[Block]:
    blocks: list[Block] = [
        Heading("Sites"),
        Table(
            sites_table(report), "Dataset fingerprint = what each site scored (no file name leaves a site)."
        ),
    ]
    unusable = [s for s in report.sites if s.status != "ok"]
    if unusable:
        blocks += [
            Text("Sites without a usable result:"),
            Bullets(
                tuple(
                    f"{s.site}"
                    + (f" (node {s.node_id})" if s.node_id is not None else "")
                    + f": {s.status} - {s.reason or 'no reason given'}"
                    for s in unusable
                )
            ),
        ]
    notes = [*report.notes, *consistency_notes(report)]
    if notes:
        blocks += [Heading("Notes", 3), Bullets(tuple(notes))]
    return blocks


def _training_section(rounds: Sequence[RoundRecord]) -> list[Block]:
    if not rounds:
        return []
    return [
        Heading("Training rounds"),
        Table(
            training_table(rounds),
            "Pooled validation loss = sum of the sites' validation losses / their validation slices; "
            "IoU pooled over pixels.",
        ),
        Image("training_loss", figures.training_figure(rounds), "Validation loss per round."),
    ]


def _scores_section(payloads: Mapping[str, EvaluationPayload], pooled: Pooled) -> list[Block]:
    blocks: list[Block] = [
        Heading("IoU bins (the seed's Table 2 layout)"),
        Text(
            "Slices per IoU bin for M (muscle), S (subcutaneous fat), V (visceral fat) and MSV (the three "
            "together: intersection/union summed over the three). Ratio = row total / defined slice-class "
            "cells (the seed divides by 4 x slices, which assumes every class is defined on every slice); "
            "the 'undefined' row counts slices where the class is empty in both masks, over all cells."
        ),
    ]
    if len(payloads) > 1:
        blocks.append(
            Table(
                seed_table(pooled.scores, pooled.n_used),
                f"Pooled: counts summed over {len(payloads)} sites ({pooled.n_used} slices).",
                index=True,
            )
        )
    for site, p in payloads.items():
        blocks.append(Table(seed_table(p.scores, p.n_used), f"{site}: {p.n_used} slices.", index=True))
    columns: dict[str, Mapping[str, ClassScores]] = {site: p.scores for site, p in payloads.items()}
    if len(payloads) > 1:
        columns[POOLED] = pooled.scores
    blocks += [
        Image("iou_bins", figures.iou_bins_figure(columns, METRIC_CLASSES), "Share of slices per IoU bin."),
        Heading("IoU and Dice summary", 3),
        Table(
            iou_summary_table(columns),
            "Mean and sd over slices where the class is defined (pooled row: exact over all sites' slices); "
            f"median and quartiles of the pooled row are {NOT_POOLABLE} from summaries; "
            "iou_pooled_over_pixels = summed intersection / summed union.",
        ),
    ]
    return blocks


def _agreement_section(
    report: StudyReport, payloads: Mapping[str, EvaluationPayload], pooled: Pooled
) -> list[Block]:
    area_rows: dict[str, Mapping[str, AreaAgreement]] = {site: p.areas for site, p in payloads.items()}
    smi_rows: dict[str, SmiAgreement | None] = {site: p.smi for site, p in payloads.items()}
    sarc_rows: dict[str, SarcopeniaConfusion | None] = {site: p.sarcopenia for site, p in payloads.items()}
    if len(payloads) > 1:
        area_rows[POOLED], smi_rows[POOLED], sarc_rows[POOLED] = pooled.areas, pooled.smi, pooled.sarcopenia
    test = _test_word(report.task)
    blocks: list[Block] = [
        Heading("Area agreement"),
        Table(
            area_table(area_rows),
            f"Tissue areas, test ({test}) - label, cm²; limits = mean ± 1.96 sd. Pooled mean HU is the "
            "sites' mean HU weighted by slices (exact only when the tissue is on every slice).",
        ),
        Image(
            "area_agreement", figures.area_agreement_figure(area_rows, TISSUES), "Area agreement per site."
        ),
    ]
    smi_present = {k: v for k, v in smi_rows.items() if v is not None and v.n > 0}
    if smi_present:
        blocks += [
            Heading("Skeletal muscle index (SMI) agreement"),
            Table(smi_table(smi_present), "SMI in cm²/m² over slices with a known height; test - label."),
            Image("smi_agreement", figures.smi_figure(smi_present), "SMI agreement per site."),
        ]
    frame = sarcopenia_table(sarc_rows)
    if not frame.empty:
        blocks += [
            Heading("Sarcopenia calls"),
            Table(
                frame,
                "Slices called sarcopenic by the label (truth) and by the test, cut-off set "
                f"{report.cutoff_set}; unknown = no height or sex. Counts are slices (a patient with "
                "several slices counts several times).",
            ),
        ]
    return blocks


def attribute_findings(payloads: Mapping[str, EvaluationPayload]) -> dict[str, dict[str, str]]:
    """Tell "the reference (model) differs from the sites" apart from "this site labels differently".

    Among the sites with a discrepancy analysis (at least two), a systematic finding shown by
    more than half of them describes the reference: with the model as reference, the model's
    own convention or error. One shown by half or fewer is a site label convention. Returns
    site -> finding key -> "shared" | "site".
    """
    analysed = {s: p for s, p in payloads.items() if p.discrepancy is not None and p.discrepancy.n_slices}
    systematic = {s: {finding_key(f) for f in site_findings(p) if f.systematic} for s, p in analysed.items()}
    counts = Counter(k for keys in systematic.values() for k in keys)
    n = len(systematic)
    shared = {k for k, c in counts.items() if n >= 2 and c > n / 2}
    return {
        site: {k: ("shared" if k in shared else "site") for k in keys} for site, keys in systematic.items()
    }


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


def _conventions_section(payloads: Mapping[str, EvaluationPayload], task: str) -> list[Block]:
    blocks: list[Block] = [Heading("Label conventions")]
    prevalence, systematic = findings_matrix(payloads)
    if prevalence.empty:
        blocks.append(Text("No site reported a label-convention finding."))
    else:
        shown = prevalence.map(lambda v: "" if math.isnan(v) else f"{v:.0%}")
        blocks += [
            Table(
                shown,
                "Share of slices showing each finding (class/direction/region); highlighted = systematic. "
                "Empty = not reported by that site.",
                index=True,
                highlight=systematic,
            ),
            Image(
                "findings_matrix",
                figures.findings_matrix_figure(
                    prevalence.to_numpy(),
                    systematic.to_numpy(),
                    list(prevalence.index),
                    list(prevalence.columns),
                ),
                "Sites x findings.",
            ),
        ]
    attribution = attribution_lines(payloads, task)
    if attribution:
        blocks += [
            Heading("Model or site? Shared versus site-specific findings", 3),
            Bullets(tuple(attribution)),
        ]
    impacts = [line for site, p in payloads.items() for line in impact_sentences(site, p)]
    if impacts:
        blocks += [Heading("Impact of systematic findings", 3), Bullets(tuple(impacts))]
    polar = {
        site: p.discrepancy.polar for site, p in payloads.items() if p.discrepancy and p.discrepancy.polar
    }
    if polar:
        keys = sorted(
            {k for m in polar.values() for k in m.maps},
            key=lambda k: (TISSUES.index(k.split(":")[0]) if k.split(":")[0] in TISSUES else 9, k),
        )
        blocks.append(
            Image(
                "polar_maps",
                figures.polar_maps_figure(polar, keys),  # type: ignore[arg-type]
                "Where the site's labels and the test disagree: discordant cm² per slice by angle and "
                "normalised radius (0 centre, 1 outline), each site divided by its own slice count; angles "
                "as the sites' discrepancy analysis defines them.",
            )
        )
    harmonised = {site: p for site, p in payloads.items() if p.harmonised_scores}
    if harmonised:
        blocks += [
            Heading("Harmonised rescoring (muscle)", 3),
            Text(
                "Both masks cut to the HU ranges before scoring: contour and density conventions "
                "mostly vanish."
            ),
        ]
        bars: dict[str, Mapping[str, ClassScores]] = {}
        for site, p in harmonised.items():
            blocks.append(
                Table(
                    harmonised_table(p.scores, p.harmonised_scores or {}),
                    f"{site}: muscle IoU bins.",
                    index=True,
                )
            )
            bars[f"{site}\nraw"] = p.scores
            bars[f"{site}\nharmonised"] = p.harmonised_scores or {}
        blocks.append(
            Image(
                "harmonised_muscle",
                figures.iou_bins_figure(bars, ("muscle",)),
                "Muscle IoU bins, raw vs harmonised.",
            )
        )
    return blocks


def build_document(report: StudyReport) -> list[Block]:
    """The report's content, independent of the output format."""
    payloads = usable_payloads(report)
    pooled = pool_payloads(payloads)
    blocks = [*_header(report, len(payloads)), *_sites_section(report), *_training_section(report.training)]
    if not payloads:
        return [
            *blocks,
            Heading("Results"),
            Text("No site returned a usable result: nothing to score or pool."),
        ]
    return [
        *blocks,
        *_scores_section(payloads, pooled),
        *_agreement_section(report, payloads, pooled),
        *_conventions_section(payloads, report.task),
    ]


# --------------------------------------------------------------------------- rendering


def format_cell(value: object) -> str:
    """A table cell for people: numbers rounded, missing values as '-'."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def _rows(table: Table) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    frame = table.frame
    header = ([frame.index.name or ""] if table.index else []) + [str(c) for c in frame.columns]
    cells, marks = [], []
    for i, (label, row) in enumerate(frame.iterrows()):
        cells.append(([str(label)] if table.index else []) + [format_cell(v) for v in row.tolist()])
        flags = [bool(v) for v in table.highlight.iloc[i].tolist()] if table.highlight is not None else []
        marks.append(([False] if table.index else []) + (flags or [False] * len(frame.columns)))
    return header, cells, marks


def render_markdown(blocks: Sequence[Block], figure_paths: Mapping[str, str]) -> str:
    """Markdown text; figures are linked by their relative paths."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}\n")
        elif isinstance(block, Text):
            out.append(block.text + "\n")
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {item}" for item in block.items) + "\n")
        elif isinstance(block, Table):
            header, cells, marks = _rows(block)
            esc = [[c.replace("|", "\\|") for c in row] for row in cells]
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for row, flags in zip(esc, marks, strict=True):
                lines.append(
                    "| "
                    + " | ".join(f"**{c}**" if f and c else c for c, f in zip(row, flags, strict=True))
                    + " |"
                )
            caption = f"*{block.caption}*\n\n" if block.caption else ""
            out.append(caption + "\n".join(lines) + "\n")
        else:
            out.append(f"![{block.caption}]({figure_paths[block.name]})\n\n*{block.caption}*\n")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;color:#222;
line-height:1.4;padding:0 1em}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}
table{border-collapse:collapse;margin:.4em 0 1.2em;font-size:.85em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#eee}td:first-child,th:first-child{text-align:left}
caption{caption-side:top;text-align:left;font-style:italic;padding-bottom:.3em;color:#444}
td.sys{background:#fdd0a2;font-weight:bold;outline:2px solid #08306b}
figure{margin:1em 0}figure img{max-width:100%;height:auto}figcaption{font-style:italic;color:#444}
.table-wrap{overflow-x:auto}
"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    """One self-contained HTML page: inline CSS, figures as base64 PNG, no external resource."""
    esc = html.escape
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            body.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Bullets):
            body.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            header, cells, marks = _rows(block)
            head = "".join(f"<th>{esc(h)}</th>" for h in header)
            rows = "".join(
                "<tr>"
                + "".join(
                    f'<td class="sys">{esc(c)}</td>' if f else f"<td>{esc(c)}</td>"
                    for c, f in zip(row, flags, strict=True)
                )
                + "</tr>"
                for row, flags in zip(cells, marks, strict=True)
            )
            caption = f"<caption>{esc(block.caption)}</caption>" if block.caption else ""
            table = f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
            body.append(f'<div class="table-wrap">{table}</div>')
        else:
            data = base64.b64encode(block.png).decode("ascii")
            body.append(
                f'<figure><img alt="{esc(block.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`write_report` put everything."""

    root: Path
    json: Path
    markdown: Path
    html: Path
    tables: dict[str, Path]
    figures: dict[str, Path]


def file_stem(site: str, taken: set[str]) -> str:
    """A file-name-safe, unique stem for a site name (never 'pooled')."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", site).strip("._") or "site"
    if stem == POOLED:
        stem = f"site-{stem}"
    base, i = stem, 2
    while stem in taken:
        stem, i = f"{base}-{i}", i + 1
    taken.add(stem)
    return stem


def report_tables(report: StudyReport) -> dict[str, pd.DataFrame]:
    """The CSV tables by file stem (``tables/<stem>.csv``)."""
    payloads = usable_payloads(report)
    pooled = pool_payloads(payloads)
    tables: dict[str, pd.DataFrame] = {"sites": sites_table(report)}
    if report.training:
        tables["training_rounds"] = training_table(report.training)
    if not payloads:
        return tables
    taken: set[str] = set()
    scores: dict[str, Mapping[str, ClassScores]] = {}
    for site, p in payloads.items():
        tables[f"{file_stem(site, taken)}_iou_bins"] = seed_table(p.scores, p.n_used)
        scores[site] = p.scores
    tables[f"{POOLED}_iou_bins"] = seed_table(pooled.scores, pooled.n_used)
    scores[POOLED] = pooled.scores
    tables["iou_summary"] = iou_summary_table(scores)
    tables["area_agreement"] = area_table({**{s: p.areas for s, p in payloads.items()}, POOLED: pooled.areas})
    tables["smi_agreement"] = smi_table({**{s: p.smi for s, p in payloads.items()}, POOLED: pooled.smi})
    tables["sarcopenia_confusion"] = sarcopenia_table(
        {**{s: p.sarcopenia for s, p in payloads.items()}, POOLED: pooled.sarcopenia}
    )
    findings = findings_table(payloads)
    if not findings.empty:
        tables["findings"] = findings
    harmonised = [
        harmonised_table(p.scores, p.harmonised_scores).reset_index().assign(site=site)
        for site, p in payloads.items()
        if p.harmonised_scores
    ]
    if harmonised:
        tables["harmonised_muscle_bins"] = pd.concat(harmonised, ignore_index=True)
    return tables


def write_report(report: StudyReport, out_dir: Path) -> ReportPaths:
    """Write report.json, tables/*.csv, figures/*.png, report.md and report.html into ``out_dir``."""
    out_dir = Path(out_dir)
    (out_dir / "tables").mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    table_paths = {}
    for stem, frame in report_tables(report).items():
        path = out_dir / "tables" / f"{stem}.csv"
        frame.to_csv(path, index=frame.index.name is not None)
        table_paths[stem] = path
    blocks = build_document(report)
    figure_paths = {}
    for block in blocks:
        if isinstance(block, Image):
            path = out_dir / "figures" / f"{block.name}.png"
            path.write_bytes(block.png)
            figure_paths[block.name] = path
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(
        render_markdown(blocks, {k: v.relative_to(out_dir).as_posix() for k, v in figure_paths.items()}),
        encoding="utf-8",
    )
    html_path.write_text(render_html(blocks, f"sarcofed study report: {report.study_name}"), encoding="utf-8")
    log.info("study report written to %s", out_dir)
    return ReportPaths(out_dir, json_path, md_path, html_path, table_paths, figure_paths)


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
        m = p.scores.get("muscle")
        top = _percent(m.bins.get(IOU_BINS[0], 0), sum(m.bins.values())) if m else "-"
        systematic = [finding_key(f) for f in site_findings(p) if f.systematic]
        lines.append(
            f"{s.site}: ok, {p.n_used}/{p.n_listed} slices, muscle IoU >= 0.9 in {top}"
            + (f", systematic: {', '.join(systematic)}" if systematic else "")
        )
    if len(payloads) > 1:
        pooled = pool_payloads(payloads)
        m = pooled.scores["muscle"]
        lines.append(
            f"pooled ({len(payloads)} sites, {pooled.n_used} slices): muscle IoU >= 0.9 in "
            f"{_percent(m.bins.get(IOU_BINS[0], 0), sum(m.bins.values()))}"
        )
    return lines
