"""What a site sends back. Aggregates only: counts, sums, means, quantiles, histograms.

Never pixel data, masks, per-slice values, file names, identifiers or dates. The site's
release policy validates every reply against these schemas (an allow-list of fields).
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import Field

from protocols.base import Schema
from protocols.compute import ComputeUsed
from protocols.findings import Finding, KeyStats, LabelAudit
from protocols.protocol import LabelProtocol

#: The ``suppressed`` mark saying medians and quartiles were withheld (they are order statistics:
#: the values of individual slices; with n, mean and sd they give back every value of a small site).
QUANTILES_MARK: Final = "quantiles"


class Distribution(Schema):
    """Summary of a per-slice value over the slices where it is defined."""

    n: int = Field(ge=0)
    mean: float | None = None
    sd: float | None = None
    median: float | None = None
    q1: float | None = None
    q3: float | None = None


class ClassScores(Schema):
    """The seed's per-class table column, plus what pooling across sites needs."""

    bins: dict[str, int] = Field(description="slice count per IoU bin, keys = protocols.classes.IOU_BINS")
    undefined: int = Field(ge=0, description="slices where the class is empty in both masks (no IoU)")
    iou: Distribution
    dice: Distribution
    intersection_px: int = Field(ge=0, description="pooled over pixels")
    union_px: int = Field(ge=0, description="pooled over pixels")


class AreaAgreement(Schema):
    """Area agreement for one tissue (test = model or reference, versus the site label).

    Differences are test - label, in cm^2, over ``n`` slices. ``sum_diff`` and
    ``sum_sq_diff`` let the coordinator pool Bland-Altman limits across sites exactly.
    """

    n: int = Field(ge=0)
    mean_label_cm2: float | None = None
    mean_test_cm2: float | None = None
    mean_diff_cm2: float | None = None
    sd_diff_cm2: float | None = None
    sum_diff_cm2: float = 0.0
    sum_sq_diff_cm2: float | None = Field(
        default=0.0, description="None when withheld (a differentially private reply): no sd, no limits"
    )
    mean_hu_label: float | None = None
    mean_hu_test: float | None = None


class SmiAgreement(Schema):
    """Skeletal muscle index (cm^2/m^2) agreement over slices with a known height."""

    n: int = Field(ge=0)
    mean_label: float | None = None
    mean_test: float | None = None
    mean_diff: float | None = None
    sd_diff: float | None = None
    sum_diff: float = 0.0
    sum_sq_diff: float | None = Field(
        default=0.0, description="None when withheld (a differentially private reply): no sd, no limits"
    )


class SarcopeniaConfusion(Schema):
    """Sarcopenia calls, site label (truth) versus test, under a named cut-off set."""

    cutoff_set: str
    both_sarcopenic: int = Field(ge=0)
    label_only: int = Field(ge=0, description="label says sarcopenic, test does not")
    test_only: int = Field(ge=0, description="test says sarcopenic, label does not")
    neither: int = Field(ge=0)
    unknown: int = Field(ge=0, description="slices without height or sex")


class PolarMap(Schema):
    """Discordant area (cm^2) summed over slices, angle x normalised radius, per class and direction.

    Angle bins split 0..360 degrees around the body centroid: 0 is anterior (derived from
    the spine, not assumed), 90 is image-right when anterior is image-up (the patient's left
    on a supine slice in radiological display), 180 posterior. Radius bins split 0 (body
    centroid) .. 1 (body outline at that angle). Divide by ``n_slices`` for cm^2 per slice.
    """

    n_angle: int = Field(ge=1)
    n_radius: int = Field(ge=1)
    n_slices: int = Field(ge=0)
    maps: dict[str, list[list[float]]] = Field(
        description="key '<class>:<direction>' -> n_angle x n_radius summed cm^2"
    )


class DiscrepancySummary(Schema):
    """Aggregate discrepancy statistics of one site (see protocols.findings and common.discrepancy)."""

    n_slices: int = Field(ge=0, description="slices analysed")
    findings: list[Finding] = Field(
        description="systematic first, then scattered ones with prevalence >= 0.2"
    )
    region_area_share: dict[str, float] = Field(
        default_factory=dict,
        description="'<class>:<direction>:<region>' -> discordant area / reference class area, "
        "mean over slices",
    )
    polar: PolarMap | None = None
    key_stats: dict[str, KeyStats] = Field(
        default_factory=dict,
        description="'<class>:<direction>:<region>' -> sufficient statistics, for every kind seen",
    )
    n_no_spine: int = Field(
        default=0, ge=0, description="slices where no spine was found (regions named from the body alone)"
    )
    suppressed: list[str] = Field(
        default_factory=list, description="parts withheld because there were fewer slices than the minimum"
    )


Role = Literal["internal", "external"]


class DpRelease(Schema):
    """How a reply was made differentially private (when the site's policy asks for it).

    ``noised``: payload path -> expected error of that number (the standard deviation of the
    noise added to it, in its own unit: slices, cm^2, ...). Everything the release withholds is
    named in the payload's ``suppressed``.
    """

    epsilon: float = Field(gt=0, description="privacy loss of this reply, per patient")
    delta: float = Field(ge=0, le=1)
    mechanism: str
    max_slices_per_patient: int = Field(ge=1)
    noised: dict[str, float] = Field(default_factory=dict)


class EvaluationPayload(Schema):
    """Everything a site sends after scoring a model (``evaluate``) or two label sets (``compare``).

    ``evaluate``: ``scores``, areas, SMI and sarcopenia calls use the model's prediction cut to
    the study protocol's HU ranges (what body-composition tools report, and what verdicts
    use); ``raw_scores`` keep the prediction as it came out of the network. A site that
    trained the model (``role`` internal) is scored on its held-out test patients only
    (``split`` test); any other site on every usable slice (external).
    """

    schema_version: Literal["2"] = "2"
    task: Literal["evaluate", "compare"]
    site: str
    dataset_fingerprint: str
    model_hash: str | None = None
    n_listed: int = Field(ge=0, description="rows in manifest.csv")
    n_used: int = Field(ge=0, description="slices scored")
    n_groups: int = Field(ge=0, description="distinct patients (manifest 'group') among scored slices")
    excluded: dict[str, int] = Field(default_factory=dict, description="ExclusionReason -> count")
    scores: dict[str, ClassScores] = Field(description="keys = protocols.classes.METRIC_CLASSES")
    areas: dict[str, AreaAgreement] = Field(description="keys = protocols.classes.TISSUES")
    smi: SmiAgreement | None = None
    sarcopenia: SarcopeniaConfusion | None = None
    role: Role | None = Field(
        default=None,
        description="evaluate: internal (the site trained the model; test split only) or external",
    )
    split: Literal["test", "all"] = Field("all", description="which of the site's slices were scored")
    n_in_split: int | None = Field(
        default=None, ge=0, description="manifest rows in the scored part (split 'test'), before exclusions"
    )
    protocol: LabelProtocol = Field(
        default_factory=LabelProtocol, description="the study's label protocol this site applied"
    )
    raw_scores: dict[str, ClassScores] | None = Field(
        default=None, description="evaluate: the prediction as the network gave it, before the HU ranges"
    )
    harmonised_scores: dict[str, ClassScores] | None = Field(
        default=None, description="scores after applying the protocol's HU ranges to both masks"
    )
    label_audit: LabelAudit | None = Field(
        default=None, description="the site's labels checked against the protocol, without any model"
    )
    dp: DpRelease | None = Field(
        default=None, description="set when the site released this reply with differential privacy"
    )
    discrepancy: DiscrepancySummary | None = None
    findings: list[Finding] = Field(default_factory=list)
    compute: ComputeUsed | None = Field(
        default=None, description="evaluate: the device and precision the site ran the model on"
    )
    suppressed: list[str] = Field(
        default_factory=list, description="cells suppressed by the site's policy (never silently zeroed)"
    )
