"""A site's patients split into train / validation / test, deterministically, never straddling.

The seed paper's internal numbers mean something because its test slices were never
trained on. Every site that trains splits its *patients* (manifest ``group``) three ways:

- **test**: held out; the study's internal validation scores these slices and nothing else;
- **validation**: early stopping and best-model choice;
- **train**: local training.

Each patient's part follows from its own hash alone: ``u = sha256(seed, key) / 2**256``,
uniform in [0, 1), puts it in **test** when ``u < test_fraction``, in **validation** when
``u < test_fraction + val_fraction``, else in **train**. So the split depends only on the seed
and the site's own data (not on row order), and a patient keeps its part when others are
added: a study run again after the site adds patients never moves a patient between parts
(no former test patient into training, no patient the model trained or was selected on into
test). The parts hold *about* those fractions of the patients (each patient is a coin toss).

Tiny sites: the hash can leave a part empty. Then, in this order, the patient with the
highest ``u`` trains when nobody would (training always keeps one patient); with at least two
patients and ``test_fraction > 0`` the lowest-``u`` patient not needed for training goes to
test; with ``val_fraction > 0`` the patient nearest the validation interval goes to
validation, taken from training or test where that part keeps another patient. A patient
placed by this rule is the one exception to stability: it may move once the site has enough
patients for the hash to fill that part.
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


def _uniform(seed: int, group: str) -> float:
    """The patient's hash as a number in [0, 1): its part follows from this alone."""
    digest = hashlib.sha256(f"sarcofed-split\0{seed}\0{group}".encode()).digest()
    return int.from_bytes(digest, "big") / 2**256


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
    u = {g: _uniform(seed, g) for g in members}
    parts: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for group, value in u.items():
        part = "test" if value < test_fraction else "val" if value < test_fraction + val_fraction else "train"
        parts[part].add(group)
    _fill_tiny_parts(parts, u, val_fraction=val_fraction, test_fraction=test_fraction)
    return PatientSplit(
        **{name: tuple(sorted(i for g in part for i in members[g])) for name, part in parts.items()}
    )


def _fill_tiny_parts(
    parts: dict[str, set[str]], u: dict[str, float], *, val_fraction: float, test_fraction: float
) -> None:
    """The tiny-site rule of the module docstring, in place: train, then test, then validation."""

    def by_u(names: set[str]) -> list[str]:
        return sorted(names, key=lambda g: (u[g], g))

    if not parts["train"]:
        top = by_u(parts["val"] | parts["test"])[-1]
        parts["val"].discard(top)
        parts["test"].discard(top)
        parts["train"].add(top)
    if test_fraction > 0 and not parts["test"] and len(u) >= 2:
        spare = parts["val"] | (parts["train"] if len(parts["train"]) > 1 else set())
        if spare:
            low = by_u(spare)[0]
            parts["val"].discard(low)
            parts["train"].discard(low)
            parts["test"].add(low)
    if val_fraction > 0 and not parts["val"]:
        spare = {g for name in ("train", "test") if len(parts[name]) > 1 for g in parts[name]}
        if spare:  # the patient nearest the validation interval [test_fraction, test + val)
            near = min(spare, key=lambda g: (abs(u[g] - test_fraction), g))
            parts["train"].discard(near)
            parts["test"].discard(near)
            parts["val"].add(near)


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
