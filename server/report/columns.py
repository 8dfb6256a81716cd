"""Column names for people, and identifiers shortened for tables: what report.md and report.html show.

The CSV tables (``tables``) keep their machine names (``n_used``, ``loa_low_cm2``); the
document shows the same frames through :func:`for_people`, which renames every column it
knows to words ("slices scored", "lower limit (cm²)"). Hashes and fingerprints are shortened
to their first :data:`SHORT` characters in tables (:func:`short_id`); the appendix keeps them whole.
"""

from __future__ import annotations

from typing import Final

import pandas as pd

#: Characters of a hash kept in a table (after a ``sha256:``-style prefix).
SHORT: Final = 12

#: Machine column name -> its name for people.
HUMAN: Final[dict[str, str]] = {
    "node_id": "node id",
    "n_listed": "slices listed",
    "n_in_split": "slices in split",
    "n_used": "slices scored",
    "n_patients": "patients",
    "dataset_fingerprint": "dataset fingerprint",
    "model_hash": "model hash",
    "verdict_code": "verdict code",
    "sites_replied": "sites replied",
    "sites_failed": "sites failed",
    "pooled_val_loss": "validation loss (pooled over slices)",
    "pooled_val_iou_muscle": "validation muscle IoU (pooled over pixels)",
    "weights_hash": "weights hash",
    "n_defined": "slices defined",
    "iou_mean_over_slices": "IoU mean over slices",
    "iou_sd": "IoU sd",
    "iou_median": "IoU median",
    "iou_q1": "IoU Q1",
    "iou_q3": "IoU Q3",
    "iou_pooled_over_pixels": "IoU pooled over pixels",
    "dice_mean_over_slices": "Dice mean over slices",
    "cutoff_set": "cut-off set",
    "both_sarcopenic": "both sarcopenic",
    "label_only": "label only",
    "test_only": "test only",
    "n": "slices",
}


def human(name: str) -> str:
    """A column's name for people (a name without a mapping: underscores as spaces)."""
    return HUMAN.get(name, name.replace("_", " "))


def for_people(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with its columns (and index name) in words; the values unchanged."""
    out = frame.rename(columns={c: human(str(c)) for c in frame.columns})
    if out.index.name:
        out.index = out.index.rename(human(str(out.index.name)))
    return out


def short_id(value: str | None) -> str | None:
    """ "sha256:0123456789ab…" / "f00dfeed1234…": a hash cut to :data:`SHORT` characters (after its
    ``algorithm:`` prefix); shorter values unchanged."""
    if value is None:
        return None
    prefix, sep, rest = value.rpartition(":") if ":" in value else ("", "", value)
    return f"{prefix}{sep}{rest[:SHORT]}…" if len(rest) > SHORT else value


__all__ = ["HUMAN", "SHORT", "for_people", "human", "short_id"]
