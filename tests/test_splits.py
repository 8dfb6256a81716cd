"""Held-out splits by patient: disjoint, deterministic, stable when a site adds patients."""

from __future__ import annotations

import numpy as np
import pytest

from common.splits import split_patients


def _groups(n_patients: int, two_slice_every: int = 3) -> list[str]:
    out = []
    for p in range(n_patients):
        out += [f"p{p}"] * (2 if p % two_slice_every == 0 else 1)
    return out


def test_parts_are_disjoint_cover_every_slice_and_never_split_a_patient() -> None:
    groups = _groups(40)
    split = split_patients(groups, val_fraction=0.2, test_fraction=0.2, seed=3)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert sum(len(p) for p in parts) == len(groups) and set().union(*parts) == set(range(len(groups)))
    assert all(a.isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1 :])
    for part in parts:
        patients = {groups[i] for i in part}
        assert all(groups[j] not in patients for other in parts if other is not part for j in other)
    assert 0.15 * len(groups) <= len(split.test) <= 0.3 * len(groups)
    assert 0.15 * len(groups) <= len(split.val) <= 0.3 * len(groups)


def test_same_seed_and_data_same_split_whatever_the_row_order() -> None:
    groups = _groups(30)
    a = split_patients(groups, val_fraction=0.2, test_fraction=0.2, seed=1)
    reordered = list(reversed(groups))
    b = split_patients(reordered, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert {groups[i] for i in a.test} == {reordered[i] for i in b.test}
    c = split_patients(groups, val_fraction=0.2, test_fraction=0.2, seed=2)
    assert {groups[i] for i in a.test} != {groups[i] for i in c.test}


def test_adding_patients_never_moves_a_test_patient_into_training() -> None:
    before = _groups(30)
    after = before + [f"new{i}" for i in range(10)]
    a = split_patients(before, val_fraction=0.2, test_fraction=0.2, seed=0)
    b = split_patients(after, val_fraction=0.2, test_fraction=0.2, seed=0)
    test_before = {before[i] for i in a.test}
    train_after = {after[i] for i in b.train}
    assert test_before.isdisjoint(train_after)


def test_tiny_sites_keep_a_patient_to_train_on() -> None:
    assert split_patients(["a", "a"], val_fraction=0.2, test_fraction=0.2, seed=0).train == (0, 1)
    two = split_patients(["a", "b"], val_fraction=0.2, test_fraction=0.2, seed=0)
    assert len(two.train) == 1 and len(two.test) == 1 and two.val == ()
    no_test = split_patients(_groups(10), val_fraction=0.25, test_fraction=0.0, seed=0)
    assert no_test.test == () and no_test.val


def test_fractions_are_checked() -> None:
    with pytest.raises(ValueError, match="leave slices to train on"):
        split_patients(["a", "b"], val_fraction=0.5, test_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1\)"):
        split_patients(["a"], val_fraction=0.1, test_fraction=-0.1, seed=0)


@pytest.mark.parametrize("n_groups", [2, 3, 7, 20])
def test_no_patient_straddles_parts_for_any_seed_or_fractions(n_groups: int) -> None:
    rng = np.random.default_rng(n_groups)
    groups = [f"g{int(rng.integers(n_groups))}" for _ in range(3 * n_groups)]
    groups[:n_groups] = [f"g{i}" for i in range(n_groups)]  # every group present
    for seed in range(30):
        for val, test in ((0.0, 0.0), (0.1, 0.2), (0.25, 0.25), (0.0, 0.5), (0.4, 0.4)):
            split = split_patients(groups, val_fraction=val, test_fraction=test, seed=seed)
            parts = (split.train, split.val, split.test)
            assert sorted(i for p in parts for i in p) == list(range(len(groups)))
            assert split.train, "training must never be empty"
            owners = [{groups[i] for i in p} for p in parts]
            assert all(owners[a].isdisjoint(owners[b]) for a in range(3) for b in range(a + 1, 3))
            assert (not split.test) or test > 0
