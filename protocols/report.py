"""The study report a coordinator reads: ``report.json`` (schema version 4).

One :class:`SiteResult` per site (with its payload when it sent one, or the status and reason
when it did not), the training rounds when the study trained, the results pooled across sites
with the sites each pooled value is over (``protocols.pooled``), and what every number depends
on: model hash, SMI cut-off set and HU ranges. ``server.report`` renders it to CSV, Markdown
and HTML; the JSON file is the record.

Version 3: the study's label ``protocol`` (replaces ``hu_ranges``), each site's ``role``
(internal: it trained the model and was scored on its held-out test patients only;
external: every usable slice) and its ``findings`` attributed by the coordinator with the
model's ``error_profile`` (pooled from the internal sites). Version 2 added ``pooled``.
Version 4: each site's ``verdict`` (a machine code and a sentence, ``server.report.verdict``).
"""

from __future__ import annotations

from importlib import metadata
from typing import Literal

from pydantic import Field, model_validator

from protocols.base import Schema
from protocols.findings import ErrorProfile, Finding
from protocols.payloads import EvaluationPayload, Role
from protocols.pooled import PooledReport
from protocols.protocol import LabelProtocol

REPORT_SCHEMA_VERSION: Literal["4"] = "4"

SiteStatus = Literal[
    "ok", "no_usable_slices", "failed", "timeout", "refused", "not_selected", "not_connected"
]


def installed_version() -> str:
    """The installed sarcofed version, or ``"unknown"`` when running from an uninstalled tree."""
    try:
        return metadata.version("sarcofed")
    except metadata.PackageNotFoundError:
        return "unknown"


VerdictCode = Literal[
    "as_internal",
    "explained_by_labelling",
    "model_underperforms",
    "too_few_slices",
    "no_reference",
    "withheld",
    "no_result",
]
"""Whether the model works at a site, by the rules of ``server.report.verdict`` (docs/REPORT.md)."""


class SiteVerdict(Schema):
    """Whether the model works at this site: a machine code and the same in one plain sentence."""

    code: VerdictCode
    sentence: str = Field(description="the verdict in plain words, with the numbers it rests on")


class SiteResult(Schema):
    """What came back from one site in the validation round."""

    site: str = Field(description="the site's name as the site reports it (a pseudonym)")
    node_id: int | None = None
    status: SiteStatus
    reason: str | None = Field(default=None, description="why the status is not 'ok', in words")
    role: Role | None = Field(
        default=None,
        description="internal: trained the model, scored on its held-out test patients only; "
        "external: scored on every usable slice (None: a comparison of label sets)",
    )
    payload: EvaluationPayload | None = None
    findings: list[Finding] = Field(
        default_factory=list,
        description="the site's findings attributed by the coordinator (its label audit and the model's "
        "error profile from the internal sites); the payload keeps what the site sent",
    )
    verdict: SiteVerdict | None = Field(
        default=None,
        description="whether the model works here (server.report.verdict; None in a comparison of label "
        "sets, which has no model); filled by the report writer",
    )

    @model_validator(mode="after")
    def _ok_has_payload(self) -> SiteResult:
        if self.status == "ok" and self.payload is None:
            raise ValueError(f"site {self.site!r}: status 'ok' needs a payload")
        if self.payload is not None and self.payload.role != self.role:
            raise ValueError(
                f"site {self.site!r}: role {self.role!r} differs from its payload's {self.payload.role!r}"
            )
        return self


class RoundRecord(Schema):
    """One federated training round, as the training study records it.

    Fields other than ``round`` are optional so that a failed round (too few replies) can be
    recorded too. ``per_site`` holds each site's training aggregates (``protocols.keys``
    metric names -> value); ``pooled_val_loss`` is the sum of the sites' validation losses
    over the sum of their validation slices (mean over slices, pooled across sites).
    """

    round: int = Field(ge=0)
    status: Literal["ok", "failed"] = "ok"
    sites_sent: list[str] = Field(default_factory=list)
    sites_replied: list[str] = Field(default_factory=list)
    sites_failed: dict[str, str] = Field(default_factory=dict, description="site -> reason")
    pooled_val_loss: float | None = None
    pooled_val_iou: dict[str, float | None] = Field(
        default_factory=dict, description="class -> validation IoU pooled over pixels across sites"
    )
    per_site: dict[str, dict[str, float]] = Field(default_factory=dict)
    compute: dict[str, str] = Field(
        default_factory=dict, description="site -> what its training ran on, e.g. 'cpu bf16' (when it said)"
    )
    weights_hash: str | None = Field(None, description="hash of the aggregated weights this round produced")
    start_weights_hash: str | None = Field(None, description="hash of the weights sent to the sites")
    improved: bool | None = None
    seconds: float | None = None


class StudyReport(Schema):
    """Everything a coordinator needs to read one study run (``report.json``)."""

    schema_version: Literal["4"] = REPORT_SCHEMA_VERSION
    sarcofed_version: str = Field(default_factory=installed_version)
    created: str = Field(description="ISO 8601 time the report was made (the study's date, no patient date)")
    run_id: str
    study_name: str
    task: Literal["evaluate", "compare"]
    model_hash: str | None = None
    model_spec: dict[str, str | int | float | list[float]] | None = None
    cutoff_set: str
    protocol: LabelProtocol = Field(
        default_factory=LabelProtocol, description="the label protocol the study follows"
    )
    sites: list[SiteResult]
    training: list[RoundRecord] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    error_profile: ErrorProfile | None = Field(
        default=None,
        description="the model's own systematic errors: its findings on the internal sites' test patients "
        "(labels following the protocol), pooled; None without an internal site",
    )
    pooled: PooledReport | None = Field(
        default=None,
        description="the sites' results pooled, with the sites each value is over; filled by the report "
        "writer (None when no site sent a usable result)",
    )

    @model_validator(mode="after")
    def _unique_sites(self) -> StudyReport:
        names = [s.site for s in self.sites]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"site names must be unique in a report; repeated: {duplicated}")
        return self
