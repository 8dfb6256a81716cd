"""The seed's story at a glance: internal vs external IoU bins side by side, and raw vs protocol-applied.

:func:`glance_table` puts the pooled internal and external groups (pooled separately, never
together) and every site in one table: role, what it was scored on, the share of slices in
each muscle IoU bin (the top bin with its 95% Wilson interval) and the MSV top bin.
:func:`raw_protocol_table` sets the bins of the prediction cut to the protocol's HU ranges
(what the verdicts use) beside those of the raw prediction, per group. Each has a machine
form (CSV) and a form for people (``*_display``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import pandas as pd

from common.pooling import has_bins
from common.stats import proportions_differ_p, wilson_interval
from protocols.classes import IOU_BINS, SEED_COLUMN
from protocols.payloads import ClassScores, EvaluationPayload
from protocols.pooled import PooledResults
from server.report.groups import Group, counts_text, plural, role_name
from server.report.tables import COVERAGE_COLUMN, ROLE_COLUMN, SUPPRESSED, UNDEFINED_ROW, percent

TOP_BIN: Final = IOU_BINS[0]
#: IoU bin -> the part of a CSV column name that names it.
BIN_SLUG: Final[dict[str, str]] = {
    "[0.9,1.0]": "0.9-1.0",
    "[0.8,0.9)": "0.8-0.9",
    "[0.7,0.8)": "0.7-0.8",
    "[0,0.7)": "0-0.7",
}
#: IoU bin -> its heading for people.
BIN_TEXT: Final[dict[str, str]] = {
    "[0.9,1.0]": "IoU ≥ 0.9",
    "[0.8,0.9)": "0.8–0.9",
    "[0.7,0.8)": "0.7–0.8",
    "[0,0.7)": "< 0.7",
}
#: The classes of the glance and raw-vs-protocol tables: muscle, and the three tissues together.
GLANCE_CLASSES: Final[tuple[str, ...]] = ("muscle", "msv")
PROTOCOL_APPLIED: Final = "protocol-applied (used for verdicts)"
RAW: Final = "raw prediction"


def share_cells(scores: ClassScores | None, bin_name: str) -> tuple[int, int, float, float, float] | None:
    """k, n (defined slices), share and its 95% Wilson interval for one bin (None when not sent)."""
    if scores is None or not has_bins(scores):
        return None
    n = sum(scores.bins[b] for b in IOU_BINS)
    k = scores.bins[bin_name]
    low, high = wilson_interval(k, n)
    return k, n, (k / n if n else float("nan")), low, high


def share_text(scores: ClassScores | None, bin_name: str = TOP_BIN, interval: bool = True) -> str:
    """ "8/10 = 80% (95% CI 49–94%)"; "suppressed" when the bins were not sent; "-" when none defined."""
    cells = share_cells(scores, bin_name)
    if cells is None:
        return SUPPRESSED
    k, n, share, low, high = cells
    if not n:
        return "0/0 (no slice with the class)"
    text = f"{k}/{n} = {share:.0%}"
    return text + (f" (95% CI {low:.0%}–{high:.0%})" if interval else "")


def _rows(
    groups: Sequence[Group],
) -> list[tuple[str, str, Mapping[str, ClassScores], str, PooledResults | None]]:
    """(label, role, scores, counts in words, pool or None): each group's pooled row, then each site."""
    rows: list[tuple[str, str, Mapping[str, ClassScores], str, PooledResults | None]] = [
        (
            g.label,
            role_name(g.role),
            g.pooled.scores,
            counts_text(g.pooled.n_used, g.pooled.n_groups, len(g.pooled.sites)),
            g.pooled,
        )
        for g in groups
    ]
    for g in groups:
        rows += [(site, role_name(p.role), p.scores, _site_counts(p), None) for site, p in g.payloads.items()]
    return rows


def _site_counts(p: EvaluationPayload) -> str:
    return counts_text(p.n_used, p.n_groups) + (" (test split)" if p.split == "test" else "")


def _coverage(pool: PooledResults | None) -> str:
    if pool is None:
        return ""
    return pool.coverage(*(f"scores.{c}.bins" for c in GLANCE_CLASSES)).describe()


def glance_table(groups: Sequence[Group]) -> pd.DataFrame:
    """Machine form (``internal_external.csv``): a row per pooled group then per site; per class of
    :data:`GLANCE_CLASSES` the defined slices, the top bin's count, every bin's share, the top bin's
    95% Wilson interval; ``coverage`` on the pooled rows."""
    out = []
    for label, role, scores, _, pool in _rows(groups):
        payload = next((g.payloads[label] for g in groups if label in g.payloads), None)
        row: dict[str, object] = {
            "site": label,
            ROLE_COLUMN: role,
            "n_sites": len(pool.sites) if pool else None,
            "n_slices": pool.n_used if pool else payload.n_used if payload else None,
            "n_patients": pool.n_groups if pool else payload.n_groups if payload else None,
        }
        for cls in GLANCE_CLASSES:
            prefix = SEED_COLUMN[cls].lower()
            top = share_cells(scores.get(cls), TOP_BIN)
            row[f"{prefix}_defined"] = top[1] if top else None
            row[f"{prefix}_{BIN_SLUG[TOP_BIN]}"] = top[0] if top else None
            for bin_name in IOU_BINS if cls == "muscle" else (TOP_BIN,):
                cells = share_cells(scores.get(cls), bin_name)
                row[f"{prefix}_{BIN_SLUG[bin_name]}_share"] = cells[2] if cells and cells[1] else None
            row[f"{prefix}_{BIN_SLUG[TOP_BIN]}_low"] = top[3] if top and top[1] else None
            row[f"{prefix}_{BIN_SLUG[TOP_BIN]}_high"] = top[4] if top and top[1] else None
        row[COVERAGE_COLUMN] = _coverage(pool)
        out.append(row)
    frame = pd.DataFrame(out)
    counts = ["n_sites", "n_slices", "n_patients"] + [
        f"{SEED_COLUMN[c].lower()}_{s}" for c in GLANCE_CLASSES for s in ("defined", BIN_SLUG[TOP_BIN])
    ]
    frame[counts] = frame[counts].astype("Int64")
    return frame


def glance_display(groups: Sequence[Group]) -> pd.DataFrame:
    """For people: the same rows, shares as text ("8/10 = 80% (95% CI 49–94%)")."""
    out = []
    for label, role, scores, counts, pool in _rows(groups):
        muscle, msv = scores.get("muscle"), scores.get("msv")
        row: dict[str, object] = {"": label, "role": role or "-", "scored": counts}
        row[f"M {BIN_TEXT[TOP_BIN]} (95% CI)"] = share_text(muscle)
        for bin_name in IOU_BINS[1:]:
            cells = share_cells(muscle, bin_name)
            row[f"M {BIN_TEXT[bin_name]}"] = (
                SUPPRESSED if cells is None else f"{cells[2]:.0%}" if cells[1] else "-"
            )
        row[f"MSV {BIN_TEXT[TOP_BIN]} (95% CI)"] = share_text(msv)
        row["pooled over"] = _coverage(pool) if pool else ""
        out.append(row)
    return pd.DataFrame(out)


def glance_caption(groups: Sequence[Group]) -> str:
    """What the glance table shows, and what each pooled row is over."""
    parts = [f"{g.label}: {g.caption}" for g in groups]
    return (
        "Share of slices per muscle (M) IoU bin and in the top bin for M, S and V together (MSV), over "
        "the slices where the class is defined, with a 95% Wilson interval for the top bin. Internal and "
        "external sites are pooled separately, never together. " + "; ".join(parts) + "."
    )


def group_test_text(groups: Sequence[Group]) -> str | None:
    """Internal vs external compared, in words: a two-sided Fisher exact test on the pooled top-bin
    counts (top bin or not, internal vs external), for M and MSV; None without both groups."""
    by_role = {g.role: g.pooled for g in groups}
    if "internal" not in by_role or "external" not in by_role:
        return None
    parts = []
    for cls in GLANCE_CLASSES:
        a = share_cells(by_role["internal"].scores.get(cls), TOP_BIN)
        b = share_cells(by_role["external"].scores.get(cls), TOP_BIN)
        if a is None or b is None or not a[1] or not b[1]:
            parts.append(f"{SEED_COLUMN[cls]}: not tested (counts withheld)")
            continue
        p = proportions_differ_p(a[0], a[1], b[0], b[1])
        parts.append(f"{SEED_COLUMN[cls]} {a[0]}/{a[1]} internal vs {b[0]}/{b[1]} external, p = {p:.2g}")
    return (
        "Internal vs external, share of slices with IoU ≥ 0.9 (each group pooled over its own sites' "
        "slices): "
        "two-sided Fisher exact test on the 2x2 table of slices in the top bin or not: "
        + "; ".join(parts)
        + ". Slices of one patient are counted as independent (the payloads carry no per-patient counts)."
    )


# --------------------------------------------------------------------------- raw vs protocol-applied


def raw_protocol_display(pooled: PooledResults) -> pd.DataFrame:
    """One group's M and MSV bins: protocol-applied (used for verdicts) beside the raw prediction."""
    columns: dict[str, list[str]] = {}
    for cls in GLANCE_CLASSES:
        for name, scores in ((PROTOCOL_APPLIED, pooled.scores), (RAW, pooled.raw_scores or {})):
            s = scores.get(cls)
            column = f"{SEED_COLUMN[cls]} {name}"
            if s is None or not has_bins(s):
                columns[column] = [SUPPRESSED] * (len(IOU_BINS) + 1)
                continue
            defined = sum(s.bins[b] for b in IOU_BINS)
            columns[column] = [percent(s.bins[b], defined) for b in IOU_BINS] + [str(s.undefined)]
    return pd.DataFrame(columns, index=pd.Index([*IOU_BINS, UNDEFINED_ROW], name="IoU"))


def raw_protocol_table(groups: Sequence[Group]) -> pd.DataFrame:
    """Machine form (``raw_vs_protocol_bins.csv``): per site and pooled group, class and scoring
    (``protocol``: the prediction cut to the protocol's HU ranges, used for verdicts; ``raw``), the
    bin counts and the undefined count. Only sites that sent raw scores (evaluate studies)."""
    out = []
    for g in groups:
        rows = [(site, p.scores, p.raw_scores) for site, p in g.payloads.items()]
        rows.append((g.label, g.pooled.scores, g.pooled.raw_scores))
        for label, protocol, raw in rows:
            if not raw:
                continue
            for cls in GLANCE_CLASSES:
                for scoring, scores in (("protocol", protocol), ("raw", raw)):
                    s = scores.get(cls)
                    if s is None:
                        continue
                    out.append(
                        {
                            "site": label,
                            ROLE_COLUMN: role_name(g.role),
                            "class": SEED_COLUMN[cls],
                            "scoring": scoring,
                            **{BIN_SLUG[b]: s.bins.get(b) for b in IOU_BINS},
                            UNDEFINED_ROW: s.undefined,
                        }
                    )
    frame = pd.DataFrame(out)
    if not frame.empty:
        frame[list(BIN_SLUG.values())] = frame[list(BIN_SLUG.values())].astype("Int64")
    return frame


def raw_protocol_caption(group: Group) -> str:
    raw_sites = [s for s, p in group.payloads.items() if p.raw_scores]
    missing = [s for s in group.payloads if s not in raw_sites]
    return (
        f"{group.caption}: slices per IoU bin (share of defined slices). {PROTOCOL_APPLIED}: the model's "
        "prediction cut to the protocol's HU ranges, as body-composition tools report it; every score, "
        f"area and verdict of this report uses it. {RAW}: as the network gave it, over "
        f"{plural(len(raw_sites), 'site')}"
        + (f" (not sent by {', '.join(missing)})" if missing else "")
        + "."
    )


__all__ = [
    "BIN_SLUG",
    "BIN_TEXT",
    "GLANCE_CLASSES",
    "PROTOCOL_APPLIED",
    "RAW",
    "glance_caption",
    "glance_display",
    "glance_table",
    "group_test_text",
    "raw_protocol_caption",
    "raw_protocol_display",
    "raw_protocol_table",
    "share_cells",
    "share_text",
]
