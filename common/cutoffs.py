"""Named L3 skeletal muscle index (SMI) cut-off sets for sarcopenia, in cm^2/m^2.

A slice is sarcopenic when its SMI is strictly below the set's threshold for the patient's
sex. Reports must name the set used (``SarcopeniaConfusion.cutoff_set``).

``martin2013`` depends on BMI for men (< 43 when BMI < 25, < 53 when BMI >= 25), and BMI is
usually unknown at a site. Without BMI we still answer when both thresholds agree: a man
with SMI < 43 is sarcopenic whatever his BMI, one with SMI >= 53 is not; between the two the
answer is unknown (None), never a guess. Women have one threshold (41) and need no BMI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocols.cutoffs import CutoffSet

__all__ = ["CUTOFF_SETS", "CutoffSet", "SmiCutoffs", "get_cutoff_set", "is_sarcopenic"]


@dataclass(frozen=True)
class SmiCutoffs:
    """Thresholds of one set: sarcopenic when SMI < threshold.

    ``men_bmi25`` is the men's threshold for BMI >= 25 when the set depends on BMI
    (``men`` then applies to BMI < 25); None when the set ignores BMI.
    """

    name: CutoffSet
    men: float
    women: float
    citation: str
    men_bmi25: float | None = None
    note: str = ""


CUTOFF_SETS: dict[CutoffSet, SmiCutoffs] = {
    CutoffSet.prado2008: SmiCutoffs(
        name=CutoffSet.prado2008,
        men=52.4,
        women=38.5,
        citation=(
            "Prado CMM et al. Prevalence and clinical implications of sarcopenic obesity in patients "
            "with solid tumours of the respiratory and gastrointestinal tracts: a population-based "
            "study. Lancet Oncol 2008;9(7):629-635. doi:10.1016/S1470-2045(08)70153-0"
        ),
        note="obese cancer patients, Canada",
    ),
    CutoffSet.martin2013: SmiCutoffs(
        name=CutoffSet.martin2013,
        men=43.0,
        men_bmi25=53.0,
        women=41.0,
        citation=(
            "Martin L et al. Cancer cachexia in the age of obesity: skeletal muscle depletion is a "
            "powerful prognostic factor, independent of body mass index. J Clin Oncol "
            "2013;31(12):1539-1547."
        ),
        note="men < 43 if BMI < 25, < 53 if BMI >= 25; women < 41 (any BMI)",
    ),
    CutoffSet.korean: SmiCutoffs(
        name=CutoffSet.korean,
        men=39.8,
        women=28.4,
        citation=(
            "Kim EH et al. Reference data and T-scores of lumbar skeletal muscle area and its skeletal "
            "muscle indices measured by CT scan in a healthy Korean population. J Gerontol A Biol Sci "
            "Med Sci 2021;76(2):265-271. doi:10.1093/gerona/glaa065"
        ),
        note="healthy Korean adults, n = 11,845; T-score < -2.0",
    ),
}


def get_cutoff_set(name: str | CutoffSet) -> SmiCutoffs:
    """The cut-off set called ``name`` (any case); an unknown name raises ValueError listing the
    valid ones."""
    try:
        key = CutoffSet(name)
    except ValueError:
        raise ValueError(f"unknown SMI cut-off set {name!r}; valid sets: {CutoffSet.choices()}") from None
    return CUTOFF_SETS[key]


def _normalise_sex(sex: str | None) -> str | None:
    if sex is None:
        return None
    value = sex.strip().upper()
    value = {"MALE": "M", "FEMALE": "F"}.get(value, value)
    return value if value in ("M", "F") else None


def is_sarcopenic(
    smi: float | None, sex: str | None, cutoff_set: str | CutoffSet, bmi: float | None = None
) -> bool | None:
    """True when ``smi`` (cm^2/m^2) is below the set's threshold for ``sex`` ("M" / "F").

    Returns None (unknown) when SMI or sex is unknown (sex "O" or anything else than M/F counts
    as unknown), and for ``martin2013`` men without BMI whose SMI lies in [43, 53).
    """
    cutoffs = get_cutoff_set(cutoff_set)
    if smi is None or math.isnan(smi):
        return None
    sex_code = _normalise_sex(sex)
    if sex_code is None:
        return None
    if sex_code == "F":
        return smi < cutoffs.women
    if cutoffs.men_bmi25 is None:
        return smi < cutoffs.men
    if bmi is not None:
        return smi < (cutoffs.men_bmi25 if bmi >= 25 else cutoffs.men)
    low, high = sorted((cutoffs.men, cutoffs.men_bmi25))
    if smi < low:
        return True
    if smi >= high:
        return False
    return None
