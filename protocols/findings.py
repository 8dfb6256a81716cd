"""Label-definition discrepancy findings (see PRODUCT.md, "Words used in discrepancy reports")."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from protocols.base import Schema

Direction = Literal["site_excludes", "site_includes"]
Region = Literal["psoas", "paraspinal", "abdominal_wall", "boundary", "intramuscular_fat", "other"]
REGIONS: tuple[str, ...] = ("psoas", "paraspinal", "abdominal_wall", "boundary", "intramuscular_fat", "other")
DIRECTIONS: tuple[str, ...] = ("site_excludes", "site_includes")
Attribution = Literal["site_convention", "model", "undetermined"]


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
    n_present: int | None = Field(
        default=None,
        ge=0,
        description="slices where the net disagreement (this direction minus the opposite) is present",
    )
    prevalence_low: float | None = Field(default=None, ge=0.0, le=1.0, description="95% Wilson interval")
    prevalence_high: float | None = Field(default=None, ge=0.0, le=1.0, description="95% Wilson interval")
    mean_net_area_cm2: float | None = Field(
        default=None, description="mean per slice of this direction's area minus the opposite direction's"
    )
    net_area_low_cm2: float | None = Field(default=None, description="95% t interval of mean_net_area_cm2")
    net_area_high_cm2: float | None = Field(default=None, description="95% t interval of mean_net_area_cm2")
    smi_shift_low: float | None = Field(default=None, description="95% t interval of smi_shift_mean")
    smi_shift_high: float | None = Field(default=None, description="95% t interval of smi_shift_mean")
    attribution: Attribution | None = Field(
        default=None, description="whose difference this is, decided by evidence (see common.attribution)"
    )
    evidence: str | None = Field(default=None, description="the evidence for the attribution, in words")


class AuditCheck(Schema):
    """One check of a site's labels against the study's label protocol, over the site's slices.

    Model-free: the image itself (HU ranges, the body frame) says what the protocol would
    label. ``n_present`` of ``n_slices`` slices showed the deviation; ``systematic`` when the
    95% Wilson interval of that share lies above one half (consistent, whatever its size),
    ``conforms`` when it lies below one half (the labels follow the protocol here).
    """

    tissue: Literal["muscle", "subcutaneous_fat", "visceral_fat"] = Field(alias="class")
    direction: Direction
    region: Region
    n_slices: int = Field(ge=0, description="slices the check applied to")
    n_present: int = Field(ge=0, description="slices showing the deviation")
    prevalence: float = Field(ge=0.0, le=1.0)
    prevalence_low: float = Field(ge=0.0, le=1.0, description="95% Wilson interval, lower bound")
    prevalence_high: float = Field(ge=0.0, le=1.0, description="95% Wilson interval, upper bound")
    systematic: bool
    conforms: bool
    mean_area_cm2: float = Field(ge=0.0, description="mean area per slice of the deviating tissue")
    mean_area_share: float = Field(ge=0.0, description="mean share of the site's (or protocol's) class area")
    sentence: str


class LabelAudit(Schema):
    """The site's labels checked against the study's label protocol, without any model."""

    protocol: str = Field(description="the protocol's name (see the study report for its definition)")
    n_slices: int = Field(ge=0)
    checks: list[AuditCheck] = Field(default_factory=list)
    not_checked: list[str] = Field(
        default_factory=list, description="'<class>:<direction>:<region>' the audit cannot check"
    )
    suppressed: list[str] = Field(default_factory=list)

    @property
    def findings(self) -> list[AuditCheck]:
        """The systematic deviations: the site's label conventions."""
        return [c for c in self.checks if c.systematic]


class KeyStats(Schema):
    """Sufficient statistics of one kind of disagreement over a site's slices (for pooling and tests).

    Over the ``n`` slices where the reference has the class: ``n_present`` slices with the net
    disagreement present, and sums / sums of squares of the per-slice net share of the class
    area and net area (this direction minus the opposite one).
    """

    n: int = Field(ge=0)
    n_present: int = Field(ge=0)
    sum_net_share: float
    sum_sq_net_share: float = Field(ge=0.0)
    sum_net_cm2: float
    sum_sq_net_cm2: float = Field(ge=0.0)


class ErrorProfile(Schema):
    """A model's own systematic errors: its findings against protocol-following labels.

    Pooled over the held-out test slices of the sites that trained it (internal
    validation), where the labels follow the study protocol, so every disagreement there is
    the model's. Travels with the model (``model.pt`` metadata) and in the study report, so
    an external site's finding can be compared with it.
    """

    source: str = Field(description="where the profile comes from, in words")
    n_sites: int = Field(ge=0)
    n_slices: int = Field(ge=0)
    key_stats: dict[str, KeyStats] = Field(
        default_factory=dict, description="'<class>:<direction>:<region>' -> pooled sufficient statistics"
    )
    withheld: dict[str, str] = Field(
        default_factory=dict,
        description="internal site -> why none of its statistics are in the profile (e.g. 'too few slices')",
    )
    withheld_keys: dict[str, list[str]] = Field(
        default_factory=dict,
        description="'<class>:<direction>:<region>' -> internal sites that withheld that kind's statistics "
        "(too few slices); its key_stats are pooled over the other sites",
    )
