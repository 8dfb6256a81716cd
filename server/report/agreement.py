"""Bland-Altman agreement for people: each estimate with its 95% interval, and what it is pooled over.

Turns the machine tables of ``tables`` (``area_table``, ``smi_table``; CSV names such as
``loa_low_ci_low_cm2``) into the document's form: "mean difference (95% CI)", "lower limit
(95% CI)", "upper limit (95% CI)" as text ("-8.1 (-12.0 to -4.2)"), every other column in
words (``columns.for_people``). Called by ``document``.
"""

from __future__ import annotations

import math
from typing import Final

import pandas as pd

from server.report.columns import for_people

#: The estimates shown with their interval: (estimate, low, high, column for people).
_WITH_INTERVAL: Final = (
    ("mean_diff", "mean_diff_ci_low", "mean_diff_ci_high", "mean difference (95% CI)"),
    ("loa_low", "loa_low_ci_low", "loa_low_ci_high", "lower limit (95% CI)"),
    ("loa_high", "loa_high_ci_low", "loa_high_ci_high", "upper limit (95% CI)"),
)
_HUMAN: Final[dict[str, str]] = {
    "mean_label": "label mean",
    "mean_test": "test mean",
    "sd_diff": "sd of differences",
    "mean_hu_label": "label mean HU",
    "mean_hu_test": "test mean HU",
    "pooling": "pooled over",
}
#: The columns whose machine name carries the unit suffix.
_UNIT_COLUMNS: Final = ("mean_label", "mean_test", "sd_diff")


def _missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def estimate_text(value: object, low: object, high: object) -> str:
    """ "-3.2 (95% CI -5.1 to -1.3)"; the estimate alone without an interval; "-" without one."""
    if _missing(value):
        return "-"
    text = f"{float(value):+.1f}"  # type: ignore[arg-type]
    if _missing(low) or _missing(high):
        return text
    return f"{text} ({float(low):+.1f} to {float(high):+.1f})"  # type: ignore[arg-type]


def agreement_display(frame: pd.DataFrame, suffix: str = "") -> pd.DataFrame:
    """An agreement table for people: intervals as text beside their estimate, names in words.
    ``suffix``: the unit suffix of the machine names (``_cm2`` for areas, none for SMI)."""
    if frame.empty:
        return frame
    unit = " (cm²)" if suffix == "_cm2" else ""
    out = frame.copy()
    for estimate, low, high, name in _WITH_INTERVAL:
        columns = [estimate + suffix, low + suffix, high + suffix]
        cells = [estimate_text(*values) for values in zip(*(out[c] for c in columns), strict=True)]
        position = int(out.columns.get_loc(columns[0]))
        out = out.drop(columns=columns)
        out.insert(position, name.replace(" (95% CI)", f"{unit} (95% CI)"), cells)
    names = {c + suffix: _HUMAN[c] + unit for c in _UNIT_COLUMNS}
    names |= {c: _HUMAN[c] for c in _HUMAN if c not in _UNIT_COLUMNS}
    return for_people(out.rename(columns=names))


__all__ = ["agreement_display", "estimate_text"]
