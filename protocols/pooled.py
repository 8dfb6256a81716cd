"""Pooled results across sites, each with the sites it is over (``report.json``'s ``pooled``).

A pooled value is a sum or an exact pooled moment over the sites that sent it. A site's
release policy may withhold a value (``EvaluationPayload.suppressed``), so a pooled value
may cover fewer sites than were pooled. As MONAI reports "not available" with a count of
valid values instead of a silent zero, a pooled value here names its :class:`Coverage`:
the sites it is over and the sites that withheld it, "incomplete" whenever one did.

Internal and external sites are pooled separately, never together: ``common.pooling`` computes
one :class:`PooledResults` per role (internal: the sites that trained the model, scored on
their held-out test patients; external: every usable slice of the other sites; no role: a
comparison of label sets); ``server.report`` adds the coverage of each table with a pooled
row and stores each as a :class:`PooledGroup` of :class:`PooledReport`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from protocols.base import Schema
from protocols.payloads import AreaAgreement, ClassScores, Role, SarcopeniaConfusion, SmiAgreement

CoverageState = Literal["complete", "incomplete"]


class Coverage(Schema):
    """Which sites one pooled value (or table) is over."""

    state: CoverageState = Field(description="'incomplete' when at least one pooled site withheld it")
    sites: list[str] = Field(description="sites whose value entered the pool")
    suppressed: list[str] = Field(
        default_factory=list,
        description="pooled sites that did not send this value (withheld by their release policy)",
    )

    @model_validator(mode="after")
    def _state_matches(self) -> Coverage:
        expected = "incomplete" if self.suppressed else "complete"
        if self.state != expected:
            raise ValueError(
                f"coverage state {self.state!r} but suppressed={self.suppressed}: expected {expected!r}"
            )
        return self

    @classmethod
    def of(cls, sites: list[str], suppressed: list[str]) -> Coverage:
        """The coverage over ``sites`` when ``suppressed`` (pooled sites too) withheld the value."""
        return cls(state="incomplete" if suppressed else "complete", sites=sites, suppressed=suppressed)

    @property
    def complete(self) -> bool:
        return not self.suppressed

    def describe(self) -> str:
        """In words: "complete: all 3 sites" or "incomplete: 1 of 3 sites suppressed (site-x)"."""
        total = len(self.sites) + len(self.suppressed)
        noun = "site" if total == 1 else "sites"
        if self.complete:
            return f"complete: {'all ' if total > 1 else ''}{total} {noun}"
        return (
            f"incomplete: {len(self.suppressed)} of {total} {noun} suppressed ({', '.join(self.suppressed)})"
        )


class PooledResults(Schema):
    """One group of sites pooled: the usable payloads of one ``role``.

    Counts (bins, undefined, pixels, exclusions, sarcopenia calls) add across sites; means and
    sds are exact over the concatenated slices; medians and quartiles are None (not poolable).
    ``withheld`` names, by payload path (``scores.muscle.bins``, ``areas.muscle``, ``smi``, ...),
    the values some pooled site did not send; :meth:`coverage` turns it into a :class:`Coverage`.
    """

    role: Role | None = Field(
        default=None, description="the role every pooled site has (None: a comparison of label sets)"
    )
    sites: list[str] = Field(description="the sites pooled (status ok, at least one slice scored)")
    n_listed: int = Field(ge=0)
    n_used: int = Field(ge=0)
    n_groups: int = Field(ge=0)
    excluded: dict[str, int] = Field(default_factory=dict)
    scores: dict[str, ClassScores]
    areas: dict[str, AreaAgreement]
    smi: SmiAgreement | None = None
    sarcopenia: SarcopeniaConfusion | None = Field(
        default=None, description="None when no site sent it or the sites used different cut-off sets"
    )
    harmonised_scores: dict[str, ClassScores] | None = Field(
        default=None, description="only when every pooled site sent harmonised scores"
    )
    raw_scores: dict[str, ClassScores] | None = Field(
        default=None,
        description="evaluate: the raw prediction's scores (before the protocol's HU ranges), pooled over "
        "the sites that sent them (see withheld); None when no site did",
    )
    withheld: dict[str, list[str]] = Field(
        default_factory=dict,
        description="payload path -> pooled sites that did not send the value there; a path not listed "
        "(nor a path above or below it) is over every pooled site",
    )

    def coverage(self, *paths: str) -> Coverage:
        """The sites the values at ``paths`` are over together (a site withholding any one is left out).

        A withheld path covers the paths below it (``scores.msv`` covers ``scores.msv.bins``)
        and a path covers what is withheld below it (``scores.msv`` is incomplete when its bins are).
        """
        left_out: set[str] = set()
        for key, sites in self.withheld.items():
            if any(key == p or p.startswith(f"{key}.") or key.startswith(f"{p}.") for p in paths):
                left_out.update(sites)
        return Coverage.of(
            [s for s in self.sites if s not in left_out], [s for s in self.sites if s in left_out]
        )


class PooledGroup(Schema):
    """One pooled group of ``report.json``: its role and n, the results, each pooled table's coverage."""

    role: Role | None = Field(description="internal, external, or None (a comparison of label sets)")
    n_sites: int = Field(ge=0, description="sites pooled")
    n_slices: int = Field(ge=0, description="slices scored, summed over the pooled sites")
    n_patients: int = Field(ge=0, description="distinct patients, summed over the pooled sites")
    results: PooledResults
    tables: dict[str, Coverage] = Field(
        default_factory=dict,
        description="CSV table stem (tables/<stem>.csv) -> the sites this group's pooled row is over",
    )

    @model_validator(mode="after")
    def _matches_results(self) -> PooledGroup:
        r = self.results
        stated = (self.role, self.n_sites, self.n_slices, self.n_patients)
        if stated != (r.role, len(r.sites), r.n_used, r.n_groups):
            raise ValueError(
                f"pooled group {stated} (role, sites, slices, patients) differs from its results "
                f"{(r.role, len(r.sites), r.n_used, r.n_groups)}"
            )
        return self

    @classmethod
    def of(cls, results: PooledResults, tables: dict[str, Coverage]) -> PooledGroup:
        return cls(
            role=results.role,
            n_sites=len(results.sites),
            n_slices=results.n_used,
            n_patients=results.n_groups,
            results=results,
            tables=tables,
        )


class PooledReport(Schema):
    """What ``report.json`` records of the pooling: one group per role, never two roles in one group."""

    groups: list[PooledGroup] = Field(description="internal first, then external, then sites without a role")

    @model_validator(mode="after")
    def _separate(self) -> PooledReport:
        roles = [g.role for g in self.groups]
        if len(set(roles)) != len(roles):
            raise ValueError(f"one pooled group per role, got roles {roles}")
        seen: dict[str, Role | None] = {}
        for g in self.groups:
            for site in g.results.sites:
                if site in seen:
                    raise ValueError(f"site {site!r} is pooled as {seen[site]!r} and as {g.role!r}")
                seen[site] = g.role
        return self

    def group(self, role: Role | None) -> PooledGroup | None:
        """The group of ``role`` (None when no usable site has it)."""
        return next((g for g in self.groups if g.role == role), None)
