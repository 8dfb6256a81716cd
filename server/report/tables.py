"""The report's tables as pandas DataFrames, from the sites' payloads and the pooled results.

Each table is one function; ``server.report.files.report_tables`` builds every CSV table of
a study from them (``tables/<stem>.csv``). Internal and external sites are pooled separately: a table has one
pooled row per group (``pooled_internal``, ``pooled_external``; ``pooled`` when the sites
have no role) and a ``role`` column on every row. A table with pooled rows has a
``coverage`` column: on a pooled row the sites it is over ("complete: all 3 sites" or
"incomplete: 1 of 3 sites suppressed (site-x)"), on a site row "suppressed" where that site
withheld the value. Numbers come from ``common.pooling``; nothing is pooled here.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import pandas as pd

from common.pooling import has_bins
from common.stats import AgreementLimits, agreement_limits
from protocols.classes import IOU_BINS, METRIC_CLASSES, SEED_COLUMN, TISSUES
from protocols.payloads import ClassScores, EvaluationPayload, Role
from protocols.pooled import Coverage, PooledResults
from protocols.report import RoundRecord, StudyReport
from server.report.groups import POOLED, pooled_label, role_name

log = logging.getLogger(__name__)

NOT_POOLABLE = "not poolable"
RATIO_COLUMN = "ratio"
COVERAGE_COLUMN = "coverage"
UNDEFINED_ROW = "undefined"
SUPPRESSED = "suppressed"
POOLING_SLICES = "over slices of all sites of its group (exact from n, sum, sum of squares)"
POOLING_SLICES_PARTIAL = "over slices of the group's sites that sent it (exact from n, sum, sum of squares)"
POOLING_SITE = "over this site's slices"
ROLE_COLUMN = "role"
#: The pooled seed table's CSV stem, after the group's label (``pooled_internal_iou_bins``).
BINS_STEM = "iou_bins"
#: The payload paths behind the pooled rows of each table (CSV stem, or BINS_STEM -> paths).
POOLED_TABLE_PATHS: dict[str, tuple[str, ...]] = {
    BINS_STEM: tuple(f"scores.{c}.{f}" for c in METRIC_CLASSES for f in ("bins", "undefined")),
    "iou_summary": tuple(
        f"scores.{c}.{f}" for c in METRIC_CLASSES for f in ("iou", "dice", "intersection_px", "union_px")
    ),
    "area_agreement": tuple(f"areas.{t}" for t in TISSUES),
    "smi_agreement": ("smi",),
    "sarcopenia_confusion": ("sarcopenia",),
}


# --------------------------------------------------------------------------- coverage


def bins_stem(role: Role | None) -> str:
    """The CSV stem of a group's pooled seed table: ``pooled_internal_iou_bins`` (``pooled_iou_bins``)."""
    return f"{pooled_label(role)}_{BINS_STEM}"


def table_coverage(pooled: PooledResults) -> dict[str, Coverage]:
    """CSV stem -> the sites the table's pooled row of this group is over (what ``report.json`` records)."""
    return {
        (bins_stem(pooled.role) if key == BINS_STEM else key): pooled.coverage(*paths)
        for key, paths in POOLED_TABLE_PATHS.items()
    }


def coverage_text(coverages: Mapping[str, Coverage]) -> str:
    """Several columns' coverage in words: one text when they agree, else grouped by column."""
    groups: dict[str, list[str]] = {}
    for label, cov in coverages.items():
        groups.setdefault(cov.describe(), []).append(label)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{', '.join(labels)}: {text}" for text, labels in groups.items())


def _site_state(pools: Sequence[PooledResults], site: str, *paths: str) -> str:
    """ "suppressed" when the site withheld a value at ``paths`` in the group it is pooled in."""
    return SUPPRESSED if any(site in p.coverage(*paths).suppressed for p in pools if site in p.sites) else ""


def _pooling_cells(pooled: PooledResults, *paths: str) -> tuple[str, str]:
    """The ``pooling`` and ``coverage`` cells of a group's pooled agreement row."""
    coverage = pooled.coverage(*paths)
    return (POOLING_SLICES if coverage.complete else POOLING_SLICES_PARTIAL), coverage.describe()


T = TypeVar("T")


def _rows(
    payloads: Mapping[str, EvaluationPayload],
    pools: Sequence[PooledResults],
    value: Callable[[EvaluationPayload | PooledResults], T],
) -> list[tuple[str, str, T, PooledResults | None]]:
    """(label, role, value, pool or None for a site row): the sites, then each group's pooled row."""
    rows: list[tuple[str, str, T, PooledResults | None]] = [
        (site, role_name(p.role), value(p), None) for site, p in payloads.items()
    ]
    rows += [(pooled_label(g.role), role_name(g.role), value(g), g) for g in pools]
    return rows


# --------------------------------------------------------------------------- IoU bins


def percent(part: int, whole: int) -> str:
    """ "part/whole (p%)", p rounded half up; "part/0 (-)" for an empty whole."""
    return f"{part}/{whole} ({math.floor(100 * part / whole + 0.5)}%)" if whole else f"{part}/0 (-)"


def seed_table(
    scores: Mapping[str, ClassScores],
    n_slices: int,
    classes: Sequence[str] = METRIC_CLASSES,
    *,
    incomplete: bool = False,
) -> pd.DataFrame:
    """The seed paper's Table 2 layout: IoU bins x M, S, V, MSV, plus the ratio column.

    Rows are the four bins and an ``undefined`` row (slices where the class is empty in both
    masks). The seed writes the ratio as row total / (4 x slices), which assumes every class
    is defined on every slice; here the denominator of a bin row is the number of *defined*
    slice-class cells (sum of the four bins over the columns), so the bin rows still add up
    to 100%. The ``undefined`` row's ratio is over all slice-class cells (columns x slices).
    A bin a site did not send (suppressed by its policy) is shown as missing, never as 0.
    ``incomplete`` (a pool that some site's counts are missing from): no ratio is computed.
    """
    columns = [SEED_COLUMN[c] for c in classes]
    counts: dict[str, list[int | None]] = {}
    for cls, column in zip(classes, columns, strict=True):
        s = scores.get(cls)
        counts[column] = [s.bins.get(b) if s else None for b in IOU_BINS] + [s.undefined if s else None]
        if (
            not incomplete
            and s is not None
            and has_bins(s)
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
        if incomplete:
            ratios.append("incomplete")
        elif frame.loc[row].isna().any() or not complete:
            ratios.append(SUPPRESSED)
        else:
            total = int(frame.loc[row].sum())
            ratios.append(percent(total, len(columns) * n_slices if row == UNDEFINED_ROW else defined))
    frame[RATIO_COLUMN] = ratios
    return frame


def pooled_seed_table(pooled: PooledResults) -> pd.DataFrame:
    """The seed table of the pooled counts, with a ``coverage`` column: the sites each row is over.

    When a site withheld some counts, the table holds the other sites' sums, says so in
    ``coverage`` (by column where the columns differ) and computes no ratio.
    """
    coverage = {
        field: {SEED_COLUMN[c]: pooled.coverage(f"scores.{c}.{field}") for c in METRIC_CLASSES}
        for field in ("bins", "undefined")
    }
    incomplete = not all(cov.complete for by_column in coverage.values() for cov in by_column.values())
    frame = seed_table(pooled.scores, pooled.n_used, incomplete=incomplete)
    frame[COVERAGE_COLUMN] = [coverage_text(coverage["bins"])] * len(IOU_BINS) + [
        coverage_text(coverage["undefined"])
    ]
    return frame


def harmonised_table(
    scored: Mapping[str, ClassScores], harmonised: Mapping[str, ClassScores]
) -> pd.DataFrame:
    """Muscle IoU bins as scored and after harmonised rescoring (both masks cut to the HU ranges)."""
    rows = {}
    for name, scores in (("M scored", scored.get("muscle")), ("M harmonised", harmonised.get("muscle"))):
        if scores is not None:
            rows[name] = [scores.bins.get(b) for b in IOU_BINS] + [scores.undefined]
    return pd.DataFrame(rows, index=pd.Index([*IOU_BINS, UNDEFINED_ROW], name="IoU"), dtype="Int64")


# --------------------------------------------------------------------------- per site and pooled rows


def limits_columns(limits: AgreementLimits | None, suffix: str = "") -> dict[str, float | None]:
    """Bland-Altman columns (machine names): the mean difference's 95% t interval, the limits of
    agreement (mean +- 1.96 sd) and each limit's approximate 95% interval (SE ~ sqrt(3 sd^2 / n),
    Bland & Altman 1986/1999), from the aggregates n, mean and sd."""
    names = (
        *("mean_diff_ci_low", "mean_diff_ci_high", "loa_low", "loa_high"),
        *("loa_low_ci_low", "loa_low_ci_high", "loa_high_ci_low", "loa_high_ci_high"),
    )
    if limits is None:
        return {f"{name}{suffix}": None for name in names}
    values = (*limits.mean_ci, limits.low, limits.high, *limits.low_ci, *limits.high_ci)
    return {f"{name}{suffix}": value for name, value in zip(names, values, strict=True)}


def _iou_row(label: str, role: str, cls: str, s: ClassScores, pooled: bool, state: str) -> dict[str, object]:
    return {
        "site": label,
        ROLE_COLUMN: role,
        "class": SEED_COLUMN[cls],
        "n_defined": s.iou.n,
        "iou_mean_over_slices": s.iou.mean,
        "iou_sd": s.iou.sd,
        "iou_median": NOT_POOLABLE if pooled and s.iou.median is None else s.iou.median,
        "iou_q1": NOT_POOLABLE if pooled and s.iou.q1 is None else s.iou.q1,
        "iou_q3": NOT_POOLABLE if pooled and s.iou.q3 is None else s.iou.q3,
        "iou_pooled_over_pixels": s.intersection_px / s.union_px if s.union_px else None,
        "dice_mean_over_slices": s.dice.mean,
        COVERAGE_COLUMN: state,
    }


def iou_summary_table(
    payloads: Mapping[str, EvaluationPayload], pools: Sequence[PooledResults] = ()
) -> pd.DataFrame:
    """Per site (and pooled per group) and class: per-slice IoU/Dice summary and IoU pooled over pixels."""
    paths = {
        c: tuple(p for p in POOLED_TABLE_PATHS["iou_summary"] if p.startswith(f"scores.{c}."))
        for c in METRIC_CLASSES
    }
    rows = []
    for label, role, scores, pool in _rows(payloads, pools, lambda p: p.scores):
        for c in METRIC_CLASSES:
            if c not in scores:
                continue
            state = pool.coverage(*paths[c]).describe() if pool else _site_state(pools, label, *paths[c])
            rows.append(_iou_row(label, role, c, scores[c], pool is not None, state))
    return pd.DataFrame(rows)


def area_table(
    payloads: Mapping[str, EvaluationPayload], pools: Sequence[PooledResults] = ()
) -> pd.DataFrame:
    """Area agreement per site (and pooled per group) and tissue, with Bland-Altman limits and their
    intervals (:func:`limits_columns`; test - label, cm^2)."""
    out = []
    for label, role, areas, pool in _rows(payloads, pools, lambda p: p.areas):
        for tissue in TISSUES:
            if tissue not in areas:
                continue
            a = areas[tissue]
            limits = limits_columns(agreement_limits(a.n, a.mean_diff_cm2, a.sd_diff_cm2), "_cm2")
            path = f"areas.{tissue}"
            pooling, state = (
                _pooling_cells(pool, path) if pool else (POOLING_SITE, _site_state(pools, label, path))
            )
            out.append(
                {
                    "site": label,
                    ROLE_COLUMN: role,
                    "tissue": tissue,
                    "n": a.n,
                    "mean_label_cm2": a.mean_label_cm2,
                    "mean_test_cm2": a.mean_test_cm2,
                    "mean_diff_cm2": a.mean_diff_cm2,
                    "sd_diff_cm2": a.sd_diff_cm2,
                    **limits,
                    "mean_hu_label": a.mean_hu_label,
                    "mean_hu_test": a.mean_hu_test,
                    "pooling": pooling,
                    COVERAGE_COLUMN: state,
                }
            )
    return pd.DataFrame(out)


def smi_table(payloads: Mapping[str, EvaluationPayload], pools: Sequence[PooledResults] = ()) -> pd.DataFrame:
    """SMI agreement (cm^2/m^2, test - label) per site and pooled per group, with limits of agreement."""
    out = []
    for label, role, s, pool in _rows(payloads, pools, lambda p: p.smi):
        if s is None:
            continue
        pooling, state = (
            _pooling_cells(pool, "smi") if pool else (POOLING_SITE, _site_state(pools, label, "smi"))
        )
        out.append(
            {
                "site": label,
                ROLE_COLUMN: role,
                "n": s.n,
                "mean_label": s.mean_label,
                "mean_test": s.mean_test,
                "mean_diff": s.mean_diff,
                "sd_diff": s.sd_diff,
                **limits_columns(agreement_limits(s.n, s.mean_diff, s.sd_diff)),
                "pooling": pooling,
                COVERAGE_COLUMN: state,
            }
        )
    return pd.DataFrame(out)


def sarcopenia_table(
    payloads: Mapping[str, EvaluationPayload], pools: Sequence[PooledResults] = ()
) -> pd.DataFrame:
    """Sarcopenia calls (label = truth) per site and pooled per group (counts of slices add)."""
    out = []
    for label, role, c, pool in _rows(payloads, pools, lambda p: p.sarcopenia):
        if c is None:
            continue
        state = pool.coverage("sarcopenia").describe() if pool else ""
        known = c.both_sarcopenic + c.label_only + c.test_only + c.neither
        positives, negatives = c.both_sarcopenic + c.label_only, c.neither + c.test_only
        out.append(
            {
                "site": label,
                ROLE_COLUMN: role,
                "cutoff_set": c.cutoff_set,
                "both_sarcopenic": c.both_sarcopenic,
                "label_only": c.label_only,
                "test_only": c.test_only,
                "neither": c.neither,
                "unknown": c.unknown,
                "agreement": (c.both_sarcopenic + c.neither) / known if known else None,
                "sensitivity": c.both_sarcopenic / positives if positives else None,
                "specificity": c.neither / negatives if negatives else None,
                COVERAGE_COLUMN: state,
            }
        )
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- sites, findings, training


def sites_table(report: StudyReport) -> pd.DataFrame:
    """One row per site: role, status and reason, what it was scored on (split, n), fingerprint,
    exclusions, and the site's verdict (``verdict_code``, ``verdict``: as stored on the report, see
    ``server.report.verdict.with_verdicts``). ``split``: ``test`` = the held-out test patients only
    (internal), ``all`` = every usable slice; ``n_in_split``: manifest rows in that split, ``n_used``:
    slices scored."""
    rows = []
    for s in report.sites:
        p = s.payload
        rows.append(
            {
                "site": s.site,
                ROLE_COLUMN: role_name(s.role),
                # Flower node ids are unsigned 64-bit: keep them as text, not int64.
                "node_id": str(s.node_id) if s.node_id is not None else None,
                "status": s.status,
                "reason": s.reason or ("" if s.status == "ok" else "no reason given"),
                "split": p.split if p else None,
                "n_listed": p.n_listed if p else None,
                "n_in_split": (p.n_in_split if p.split == "test" else p.n_listed) if p else None,
                "n_used": p.n_used if p else None,
                "n_patients": p.n_groups if p else None,
                "excluded": "; ".join(f"{k}: {v}" for k, v in sorted(p.excluded.items())) if p else None,
                "dataset_fingerprint": p.dataset_fingerprint if p else None,
                "model_hash": p.model_hash if p else None,
                "verdict_code": s.verdict.code if s.verdict else None,
                "verdict": s.verdict.sentence if s.verdict else None,
            }
        )
    columns = ["site", ROLE_COLUMN, "node_id", "status", "reason", "split", "n_listed", "n_in_split"]
    columns += ["n_used", "n_patients", "excluded", "dataset_fingerprint", "model_hash"]
    columns += ["verdict_code", "verdict"]
    frame = pd.DataFrame(rows, columns=columns)  # a training-only study has no site rows
    counts = ["n_listed", "n_in_split", "n_used", "n_patients"]
    frame[counts] = frame[counts].astype("Int64")
    return frame


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


# --------------------------------------------------------------------------- file names


def file_stem(site: str, taken: set[str]) -> str:
    """A file-name-safe, unique stem for a site name (never one a pooled table uses: 'pooled...')."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", site).strip("._") or "site"
    if stem.startswith(POOLED):
        stem = f"site-{stem}"
    base, i = stem, 2
    while stem in taken:
        stem, i = f"{base}-{i}", i + 1
    taken.add(stem)
    return stem
