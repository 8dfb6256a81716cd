"""The study's label protocol: what the study calls muscle, subcutaneous and visceral fat.

A study follows one declared definition (PRODUCT.md, "The study's label protocol"). The
default is the Alberta / Slice-O-Matic definition: psoas, paraspinals, quadratus lumborum
and the abdominal wall muscles are muscle; intramuscular fat (IMAT) is not; each tissue
is limited to its HU range. A site's *convention* is its difference from this protocol,
which the site can check on its own images without any model (``common.label_audit``).
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import Field, field_validator

from protocols.base import Schema
from protocols.payloads import HuRanges

MuscleGroup = Literal["psoas", "paraspinal", "quadratus_lumborum", "abdominal_wall"]
MUSCLE_GROUPS: Final[tuple[str, ...]] = ("psoas", "paraspinal", "quadratus_lumborum", "abdominal_wall")
MUSCLE_GROUP_TEXT: Final[dict[str, str]] = {
    "psoas": "psoas",
    "paraspinal": "paraspinal muscles",
    "quadratus_lumborum": "quadratus lumborum",
    "abdominal_wall": "abdominal wall muscles",
}


class LabelProtocol(Schema):
    """One label definition; ``describe()`` says it in words for reports."""

    name: str = Field("alberta", min_length=1, description="a short name for reports")
    muscles: tuple[MuscleGroup, ...] = Field(
        ("psoas", "paraspinal", "quadratus_lumborum", "abdominal_wall"),
        description="the muscle groups at L3 that count as skeletal muscle",
    )
    imat_in_muscle: bool = Field(False, description="intramuscular fat counted as muscle")
    hu_ranges: HuRanges = HuRanges()

    @field_validator("muscles")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(
                f"a label protocol needs at least one muscle group of {', '.join(MUSCLE_GROUPS)}"
            )
        return tuple(dict.fromkeys(value))

    def includes(self, group: str) -> bool:
        return group in self.muscles

    def describe(self) -> str:
        """The protocol in one sentence."""
        muscles = ", ".join(MUSCLE_GROUP_TEXT[m] for m in self.muscles)
        left_out = [MUSCLE_GROUP_TEXT[m] for m in MUSCLE_GROUPS if m not in self.muscles]
        hu = self.hu_ranges
        return (
            f"{self.name}: muscle = {muscles}"
            + (f" (not {', '.join(left_out)})" if left_out else "")
            + f"; intramuscular fat {'counted as' if self.imat_in_muscle else 'excluded from'} muscle; "
            f"muscle {hu.muscle[0]:g}..{hu.muscle[1]:g} HU, subcutaneous fat "
            f"{hu.subcutaneous_fat[0]:g}..{hu.subcutaneous_fat[1]:g} HU, visceral fat "
            f"{hu.visceral_fat[0]:g}..{hu.visceral_fat[1]:g} HU"
        )


#: The default study protocol (Alberta / Slice-O-Matic).
ALBERTA: Final = LabelProtocol()

__all__ = ["ALBERTA", "MUSCLE_GROUPS", "MUSCLE_GROUP_TEXT", "LabelProtocol", "MuscleGroup"]
