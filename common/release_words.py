"""What a site withheld or noised, in words a coordinator understands.

A payload names what its site's release policy withheld (``suppressed``: payload paths) and,
for a differentially private reply, what was noised and by how much (``dp.noised``: path ->
expected error). The study report and ``sarcofed site evaluate | compare`` both say it with
:func:`release_sentences`, so the two never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from protocols.payloads import QUANTILES_MARK, EvaluationPayload

_CLASS: Final[dict[str, str]] = {
    "muscle": "muscle",
    "subcutaneous_fat": "subcutaneous fat",
    "visceral_fat": "visceral fat",
    "msv": "MSV",
}
#: Finding region -> words (the report's too).
REGION_TEXT: Final[dict[str, str]] = {
    "psoas": "psoas",
    "paraspinal": "the paraspinal muscles",
    "abdominal_wall": "the abdominal wall",
    "boundary": "tissue along the contours",
    "intramuscular_fat": "intramuscular fat",
    "other": "other regions",
}
_DIRECTION: Final[dict[str, str]] = {"site_excludes": "left out of", "site_includes": "added to"}

_WHY: Final[dict[str, str]] = {
    QUANTILES_MARK: "medians and quartiles (they are individual slices' values; with n, mean and sd they "
    "give a small site's values back)",
    "n_groups": "the patient count",
    "discrepancy": "the label-definition analysis",
    "findings": "the findings",
    "label_audit": "the label audit",
    "harmonised_scores": "the harmonised scores",
    "raw_scores": "the raw-prediction scores",
    "excluded": "the exclusion counts",
    "smi": "the SMI agreement",
    "smi.sd": "the SMI difference's spread (and so its limits of agreement)",
    "sarcopenia": "the sarcopenia calls",
    "discrepancy.polar": "the polar discrepancy maps",
    "discrepancy.findings": "the label-definition findings (too few slices)",
    "discrepancy.region_area_share": "the discordant area per region (too few slices)",
    "discrepancy.key_stats": "the statistics of each kind of difference (too few slices)",
    "label_audit.checks": "the label audit's checks (too few slices)",
}
#: Marks that end in a finding kind ('<class>:<direction>:<region>'), by their prefix.
_PER_KIND: Final[dict[str, str]] = {
    "findings": "the finding",
    "discrepancy.findings": "the finding",
    "discrepancy.key_stats": "the statistics of",
    "label_audit": "the label audit's check of",
}
_SCORE_PARTS: Final[dict[str, str]] = {
    "bins": "IoU bins",
    "undefined": "undefined count",
    "iou": "IoU summary",
    "dice": "Dice summary",
    "pixels": "pixel counts (pooled-over-pixels IoU)",
}


def kind_words(key: str) -> str:
    """A finding kind '<class>:<direction>:<region>' in words ("psoas left out of muscle")."""
    parts = key.split(":")
    if len(parts) != 3:
        return key
    tissue, direction, region = parts
    where, how, what = (
        REGION_TEXT.get(region, region),
        _DIRECTION.get(direction, direction),
        _CLASS.get(tissue, tissue),
    )
    return f"{where} {how} {what}"


def _mark_text(mark: str) -> str:
    if mark in _WHY:
        return _WHY[mark]
    prefix, _, kind = mark.rpartition(".")
    if prefix in _PER_KIND and kind.count(":") == 2:
        return f"{_PER_KIND[prefix]} {kind_words(kind)} (too few slices)"
    parts = mark.split(".")
    if parts[0] in ("scores", "raw_scores", "harmonised_scores") and len(parts) >= 3:
        prefix = {"scores": "", "raw_scores": "raw ", "harmonised_scores": "harmonised "}[parts[0]]
        return f"{prefix}{_CLASS.get(parts[1], parts[1])} {_SCORE_PARTS.get(parts[2], parts[2])}"
    if parts[0] == "areas" and len(parts) >= 2:
        tissue = _CLASS.get(parts[1], parts[1])
        return (
            f"the {tissue} area spread (and so its limits of agreement)"
            if parts[-1] == "sd"
            else f"{tissue} areas"
        )
    return mark


def withheld_text(marks: Iterable[str]) -> str:
    """The withheld parts of a payload, in words, without repeats."""
    return "; ".join(dict.fromkeys(_mark_text(m) for m in marks))


def _noised_text(noised: dict[str, float]) -> list[str]:
    groups: dict[str, list[float]] = {}
    for path, error in noised.items():
        parts = path.split(".")
        if parts[0] == "scores" and parts[2] in ("bins", "undefined"):
            key = f"{_CLASS.get(parts[1], parts[1])} IoU bins (slices per bin)"
        elif parts[0] == "scores":
            key = f"{_CLASS.get(parts[1], parts[1])} IoU, sum over slices"
        elif parts[0] == "sarcopenia":
            key = "sarcopenia calls (slices per cell)"
        elif path == "n_used":
            key = "slices used"
        elif path == "areas.muscle.sum_diff_cm2":
            key = "muscle area difference, sum over slices (cm²)"
        elif path == "smi.sum_diff":
            key = "SMI difference, sum over slices (cm²/m²)"
        elif path == "smi.n":
            key = "slices with an SMI"
        else:
            key = path
        groups.setdefault(key, []).append(error)
    return [f"{key} ±{max(errors):.3g}" for key, errors in groups.items()]


def release_sentences(payload: EvaluationPayload) -> list[str]:
    """One or two sentences: how the reply was made private, what was noised and withheld."""
    out = []
    if payload.dp is not None:
        dp = payload.dp
        out.append(
            f"Released with differential privacy: epsilon {dp.epsilon:g} per patient (delta {dp.delta:g}; "
            f"{dp.mechanism}; at most {dp.max_slices_per_patient} slices per patient). Noised, with the "
            f"expected error (sd) of each number: {'; '.join(_noised_text(dp.noised))}. Means are noisy sums "
            "over noisy counts; pooled across sites, the sums add."
        )
    marks = [*payload.suppressed, *(payload.discrepancy.suppressed if payload.discrepancy else [])]
    if marks:
        out.append(f"Withheld by the site's release policy: {withheld_text(marks)}.")
    return out


__all__ = ["kind_words", "release_sentences", "withheld_text"]
