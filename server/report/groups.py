"""The report's pooled groups: internal and external sites, pooled separately, each saying its n.

A study that trained its model has *internal* sites (they trained it and were scored on their
held-out test patients only) and may have *external* ones (every usable slice of a site that
did not train it). ``common.pooling`` pools each role on its own; this module names the
groups for tables and captions: ``pooled_internal`` / ``pooled_external`` (``pooled`` for a
comparison of label sets, whose sites have no role) and "internal (held-out test patients of
the sites that trained the model), 18 slices of 16 patients at 2 sites".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from common.pooling import pool_payloads, split_by_role, usable_payloads
from protocols.payloads import EvaluationPayload, Role
from protocols.pooled import PooledResults
from protocols.report import StudyReport

POOLED: Final = "pooled"
#: What each role means, in the words of the report's captions.
ROLE_TEXT: Final[dict[Role | None, str]] = {
    "internal": "internal (held-out test patients of the sites that trained the model)",
    "external": "external (every usable slice of sites that did not train the model)",
    None: "all sites",
}
#: The same, for one site.
SITE_ROLE_TEXT: Final[dict[Role | None, str]] = {
    "internal": "internal (trained the model; held-out test patients only)",
    "external": "external (did not train the model; every usable slice)",
    None: "",
}


def role_name(role: Role | None) -> str:
    """ "internal", "external", or "" (no role: a comparison of label sets)."""
    return role or ""


def pooled_label(role: Role | None) -> str:
    """The pooled row's label and CSV stem prefix: ``pooled_internal``, ``pooled_external``, ``pooled``."""
    return f"{POOLED}_{role}" if role else POOLED


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def counts_text(n_slices: int, n_patients: int, n_sites: int | None = None) -> str:
    """ "18 slices of 16 patients at 2 sites" (the sites left out when ``n_sites`` is None)."""
    text = f"{plural(n_slices, 'slice')} of {plural(n_patients, 'patient')}"
    return text + (f" at {plural(n_sites, 'site')}" if n_sites is not None else "")


def group_caption(pooled: PooledResults) -> str:
    """ "internal (held-out test patients of the sites that trained the model), 18 slices of 16
    patients at 2 sites"."""
    return f"{ROLE_TEXT[pooled.role]}, {counts_text(pooled.n_used, pooled.n_groups, len(pooled.sites))}"


def scored_text(payload: EvaluationPayload) -> str:
    """What a site was scored on: "10 slices of 9 patients (held-out test split: 12 listed)"."""
    text = counts_text(payload.n_used, payload.n_groups)
    if payload.split == "test":
        listed = f": {payload.n_in_split} listed" if payload.n_in_split is not None else ""
        return f"{text} (held-out test split{listed})"
    return f"{text} (all slices: {payload.n_listed} listed)"


def site_caption(site: str, payload: EvaluationPayload) -> str:
    """ "hospital-a, internal (trained the model; held-out test patients only): 10 slices of ..."."""
    role = SITE_ROLE_TEXT[payload.role]
    return f"{site}{', ' + role if role else ''}: {scored_text(payload)}."


@dataclass(frozen=True)
class Group:
    """One role's usable sites and their pooled result."""

    pooled: PooledResults
    payloads: Mapping[str, EvaluationPayload]

    @property
    def role(self) -> Role | None:
        return self.pooled.role

    @property
    def label(self) -> str:
        return pooled_label(self.role)

    @property
    def caption(self) -> str:
        return group_caption(self.pooled)

    @property
    def title(self) -> str:
        """A heading: "Internal sites", "External sites" or "Sites"."""
        return f"{self.role.capitalize()} sites" if self.role else "Sites"


def groups_of(payloads: Mapping[str, EvaluationPayload]) -> list[Group]:
    """The pooled groups of these usable payloads: internal, external, then sites without a role."""
    return [Group(pool_payloads(group), group) for group in split_by_role(payloads).values()]


def report_groups(report: StudyReport) -> list[Group]:
    """The pooled groups of a report's usable sites (empty when no site sent a usable result)."""
    return groups_of(usable_payloads(report))


__all__ = [
    "POOLED",
    "Group",
    "counts_text",
    "plural",
    "pooled_label",
    "report_groups",
    "role_name",
    "site_caption",
]
