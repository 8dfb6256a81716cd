"""The study's label protocol: what the study calls muscle, subcutaneous and visceral fat.

A study follows one declared definition (PRODUCT.md, "The study's label protocol"). The
default is the Alberta / Slice-O-Matic definition: psoas, paraspinals, quadratus lumborum
and the abdominal wall muscles are muscle; intramuscular fat (IMAT) is not; each tissue
is limited to its HU range. A site's *convention* is its difference from this protocol,
which the site can check on its own images without any model (``common.label_audit``).
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import Field, field_validator, model_validator

from protocols.base import Schema


class HuRanges(Schema):
    """HU ranges used for density checks and harmonised rescoring."""

    muscle: tuple[float, float] = (-29.0, 150.0)
    subcutaneous_fat: tuple[float, float] = (-190.0, -30.0)
    visceral_fat: tuple[float, float] = (-150.0, -50.0)


MuscleGroup = Literal["psoas", "paraspinal", "quadratus_lumborum", "abdominal_wall"]
MUSCLE_GROUPS: Final[tuple[str, ...]] = ("psoas", "paraspinal", "quadratus_lumborum", "abdominal_wall")
MUSCLE_GROUP_TEXT: Final[dict[str, str]] = {
    "psoas": "psoas",
    "paraspinal": "paraspinal muscles",
    "quadratus_lumborum": "quadratus lumborum",
    "abdominal_wall": "abdominal wall muscles",
}


def _pair(value: object) -> object:
    """``"-29,150"`` (a run-config string) -> (-29.0, 150.0)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            if len(parts) == 2:
                return tuple(float(p) for p in parts)
        except ValueError:
            pass
        raise ValueError(f"expected 'low,high' in HU (e.g. '-29,150'), got {value!r}")
    return value


def _canonical(value: object) -> object:
    """Muscle groups compare as a set (their order means nothing); anything else as it is."""
    return frozenset(value) if isinstance(value, tuple) and all(isinstance(v, str) for v in value) else value


def _groups(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


#: The name of the default protocol; only the Alberta definition itself may carry it.
ALBERTA_NAME: Final = "alberta"


class LabelProtocol(Schema):
    """One label definition; ``describe()`` says it in words for reports.

    Flat fields, so that a study sets it through run-config keys (``protocol.muscles``,
    ``protocol.muscle-hu`` = ``"-29,150"`` ...).
    """

    name: str = Field(ALBERTA_NAME, min_length=1, description="a short name for reports")
    muscles: tuple[MuscleGroup, ...] = Field(
        ("psoas", "paraspinal", "quadratus_lumborum", "abdominal_wall"),
        description="the muscle groups at L3 that count as skeletal muscle",
    )
    imat_in_muscle: bool = Field(False, description="intramuscular fat counted as muscle")
    muscle_hu: tuple[float, float] = HuRanges().muscle
    subcutaneous_fat_hu: tuple[float, float] = HuRanges().subcutaneous_fat
    visceral_fat_hu: tuple[float, float] = HuRanges().visceral_fat

    _parse_pairs = field_validator("muscle_hu", "subcutaneous_fat_hu", "visceral_fat_hu", mode="before")(
        _pair
    )
    _parse_groups = field_validator("muscles", mode="before")(_groups)

    @field_validator("muscles")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            choices = ", ".join(MUSCLE_GROUPS)
            raise ValueError(f"a label protocol needs at least one muscle group of {choices}")
        return tuple(dict.fromkeys(value))

    @field_validator("muscle_hu", "subcutaneous_fat_hu", "visceral_fat_hu")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"an HU range is (low, high) with low < high, got {value}")
        return value

    @model_validator(mode="after")
    def _alberta_means_alberta(self) -> LabelProtocol:
        """A protocol named Alberta is the Alberta definition: else every report would misname it."""
        if self.name.strip().lower() != ALBERTA_NAME:
            return self
        reference = LabelProtocol.model_construct()  # the defaults: Alberta
        differs = [
            name.replace("_", "-")
            for name in type(self).model_fields
            if name != "name" and _canonical(getattr(self, name)) != _canonical(getattr(reference, name))
        ]
        if differs:
            raise ValueError(
                f"protocol.name: this protocol differs from Alberta in {', '.join(differs)}; give it its own "
                'name, e.g. protocol.name="site-x-2024"'
            )
        return self

    @property
    def hu_ranges(self) -> HuRanges:
        return HuRanges(
            muscle=self.muscle_hu,
            subcutaneous_fat=self.subcutaneous_fat_hu,
            visceral_fat=self.visceral_fat_hu,
        )

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

__all__ = [
    "ALBERTA",
    "ALBERTA_NAME",
    "MUSCLE_GROUPS",
    "MUSCLE_GROUP_TEXT",
    "HuRanges",
    "LabelProtocol",
    "MuscleGroup",
]
