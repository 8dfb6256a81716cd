"""Label-definition discrepancy findings (see PRODUCT.md, "Words used in discrepancy reports")."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from protocols.base import Schema

Direction = Literal["site_excludes", "site_includes"]
Region = Literal["psoas", "paraspinal", "abdominal_wall", "boundary", "intramuscular_fat", "other"]
REGIONS: tuple[str, ...] = ("psoas", "paraspinal", "abdominal_wall", "boundary", "intramuscular_fat", "other")
DIRECTIONS: tuple[str, ...] = ("site_excludes", "site_includes")


class Finding(Schema):
    """One named way in which a site's labels differ from the reference.

    JSON field names are exactly: class, direction, region, prevalence, mean_area_share,
    density_consistency, sentence (plus systematic, n_slices, mean_area_cm2).
    """

    tissue: Literal["muscle", "subcutaneous_fat", "visceral_fat"] = Field(alias="class")
    direction: Direction
    region: Region
    prevalence: float = Field(ge=0.0, le=1.0, description="share of slices where it occurs")
    mean_area_share: float = Field(ge=0.0, description="mean discordant area / reference class area")
    mean_area_cm2: float = Field(ge=0.0, description="mean discordant area per slice, cm^2")
    density_consistency: float = Field(
        ge=0.0, le=1.0, description="share of the discordant pixels whose HU lies in the class range"
    )
    systematic: bool
    n_slices: int = Field(ge=0)
    sentence: str
    smi_shift_mean: float | None = Field(
        default=None,
        description="muscle findings: mean change of this site's SMI (cm^2/m^2) if it labelled like the "
        "reference, over slices with a known height",
    )
    calls_changed: int | None = Field(
        default=None, ge=0, description="slices whose sarcopenia call would change (study cut-off set)"
    )
    calls_known: int | None = Field(default=None, ge=0, description="slices with height (and sex) known")
