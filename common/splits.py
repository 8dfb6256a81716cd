"""A site's patients split into train / validation / test, deterministically, never straddling.

The seed paper's internal numbers mean something because its test slices were never
trained on. Every site that trains splits its *patients* (manifest ``group``) three ways:

- **test**: held out; the study's internal validation scores these slices and nothing else;
- **validation**: early stopping and best-model choice;
- **train**: local training.

Patients are ranked by a hash of the study seed and their pseudonymous key, so the split
depends only on the seed and the site's own data (not on row order), and a patient keeps
its part when others are added: a study run again after the site adds patients never moves
a former test patient into training. Parts are filled in that rank order until they hold
``round(fraction * slices)`` slices (at least one patient each when the fraction is above 0);
training always keeps at least one patient, test is filled before validation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.dataset import row_group

if TYPE_CHECKING:
    from common.dataset import SiteDataset
    from protocols.study import TrainSection


@dataclass(frozen=True)
class PatientSplit:
    """Slice indices of each part (sorted); a patient's slices are all in one part."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def part_of(self, index: int) -> str:
        for name in ("train", "val", "test"):
            if index in getattr(self, name):
                return name
        raise KeyError(f"slice {index} is in no part of the split")


def _rank(seed: int, group: str) -> str:
    return hashlib.sha256(f"sarcofed-split\0{seed}\0{group}".encode()).hexdigest()


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def split_patients(
    groups: Sequence[str], *, val_fraction: float, test_fraction: float, seed: int
) -> PatientSplit:
    """Split slices (given by their patient keys) into train / val / test (see module docstring)."""
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            "val_fraction + test_fraction must leave slices to train on, "
            f"got {val_fraction} + {test_fraction}"
        )
    if not groups:
        return PatientSplit(train=(), val=(), test=())
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(str(group), []).append(index)
    order = sorted(members, key=lambda g: (_rank(seed, g), g))
    parts: dict[str, list[str]] = {"test": [], "val": []}
    available = list(order)
    for part, fraction in (("test", test_fraction), ("val", val_fraction)):
        if fraction <= 0:
            continue
        target = max(1, round(fraction * len(groups)))
        taken = 0
        while available[1:] and taken < target:  # the last remaining patient always trains
            group = available.pop(0)
            parts[part].append(group)
            taken += len(members[group])
    return PatientSplit(
        train=tuple(sorted(i for g in available for i in members[g])),
        val=tuple(sorted(i for g in parts["val"] for i in members[g])),
        test=tuple(sorted(i for g in parts["test"] for i in members[g])),
    )


def split_site(site: SiteDataset, train: TrainSection) -> PatientSplit:
    """The split of a parsed site's valid manifest rows (indices into ``site.rows``).

    Over the manifest rows, not the usable slices: training and evaluation compute the same
    split whatever files fail to load (an unusable row is then simply not trained on or scored).
    """
    groups = [row_group(site, i) for i in range(len(site.rows))]
    return split_patients(
        groups, val_fraction=train.val_fraction, test_fraction=train.test_fraction, seed=train.seed
    )


__all__ = ["PatientSplit", "split_patients", "split_site"]
