"""common.cutoffs: named SMI cut-off sets and sarcopenia calls."""

from __future__ import annotations

import pytest

from common.cutoffs import CutoffSet, get_cutoff_set, is_sarcopenic


def test_every_set_has_a_citation_and_unknown_names_list_valid_ones() -> None:
    for name in CutoffSet:
        assert get_cutoff_set(name.value).citation
    with pytest.raises(ValueError, match="prado2008, martin2013, korean"):
        get_cutoff_set("prado")


@pytest.mark.parametrize(
    ("smi", "sex", "cutoff_set", "expected"),
    [
        (52.3, "M", "prado2008", True),
        (52.4, "M", "prado2008", False),  # strictly below
        (38.4, "F", "prado2008", True),
        (45.0, "F", "prado2008", False),
        (39.7, "M", "korean", True),
        (45.0, "M", "korean", False),  # not sarcopenic in Korea, sarcopenic under Prado
        (28.3, "F", "korean", True),
        (30.0, "F", "korean", False),
        (40.0, "F", "martin2013", True),  # women need no BMI
        (42.0, "M", "martin2013", True),  # below both men's thresholds: sarcopenic whatever the BMI
        (53.0, "M", "martin2013", False),  # above both: not sarcopenic whatever the BMI
        (48.0, "M", "martin2013", None),  # between 43 and 53 without BMI: unknown
        (50.0, None, "prado2008", None),
        (50.0, "O", "prado2008", None),
        (None, "M", "prado2008", None),
        (30.0, "female", "prado2008", True),
    ],
)
def test_is_sarcopenic(smi: float | None, sex: str | None, cutoff_set: str, expected: bool | None) -> None:
    assert is_sarcopenic(smi, sex, cutoff_set) is expected


def test_martin_uses_bmi_when_given() -> None:
    assert is_sarcopenic(48.0, "M", "martin2013", bmi=24.9) is False
    assert is_sarcopenic(48.0, "M", "martin2013", bmi=25.0) is True
    assert is_sarcopenic(40.5, "F", "martin2013", bmi=30.0) is True
