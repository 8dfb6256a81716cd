"""Pool the sites' payloads into study results: the one owner of every cross-site number.

Inputs are :class:`~protocols.payloads.EvaluationPayload` aggregates (sufficient statistics);
outputs are :class:`~protocols.pooled.PooledResults`, one per role: internal sites (they
trained the model and were scored on their held-out test patients) and external sites
(every usable slice) are pooled separately, never together; sites without a role (a
comparison of label sets) form one group. Pure: numpy-free arithmetic on the protocols
schemas, no pandas, no Flower. Callers: ``server.report`` (tables, document, summary),
``common.attribution`` (the model's error profile) and the tests.

Every pooled number names its pooling:

- IoU-bin counts, undefined counts, intersection/union pixels, exclusions and sarcopenia
  calls *add* across sites.
- Mean and sd of per-slice IoU/Dice and of area/SMI differences are exact over the
  concatenated slices of all sites (from n, mean, sd or n, sum, sum of squares);
  Bland-Altman limits are mean +- 1.96 sd of the pooled differences.
- Medians and quartiles cannot be pooled from summaries: they are None.

and every pooled value knows the sites it is over: a value a site withheld (its release
policy suppressed it, so it is absent, empty or zero in the payload) is pooled over the other
sites only, and :meth:`~protocols.pooled.PooledResults.coverage` says "incomplete" and names
the site. Never a silent partial sum.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from common.stats import LIMITS_Z, mean_interval
from protocols.classes import IOU_BINS, METRIC_CLASSES, TISSUES
from protocols.findings import ErrorProfile, KeyStats
from protocols.payloads import (
    AreaAgreement,
    ClassScores,
    Distribution,
    EvaluationPayload,
    Role,
    SarcopeniaConfusion,
    SmiAgreement,
)
from protocols.pooled import PooledResults
from protocols.report import SiteResult, StudyReport

#: Bland-Altman limits of agreement: mean +- LOA_Z sd (``common.stats`` owns the number).
LOA_Z = LIMITS_Z
#: Top-level payload fields that are pooled (a suppression mark elsewhere does not touch a pooled value).
POOLED_FIELDS: tuple[str, ...] = (
    "excluded",
    "scores",
    "raw_scores",
    "harmonised_scores",
    "areas",
    "smi",
    "sarcopenia",
)
#: The pooled groups, in report order: internal, external, then sites without a role.
ROLE_ORDER: Final[tuple[Role | None, ...]] = ("internal", "external", None)


# --------------------------------------------------------------------------- one value


def pool_distributions(parts: Sequence[Distribution]) -> Distribution:
    """n, mean and sd of the concatenated values, exactly, from each part's (n, mean, sd).

    The pooled sd uses the parallel-variance identity SS = sum((n_i - 1) sd_i^2 +
    n_i (mean_i - mean)^2) (a part with n_i = 1 has no sd and contributes 0 within). The median
    and quartiles cannot be pooled from summaries: they are None, unless a single part holds
    all the values (then it is returned unchanged). A part released without its sd (a
    differentially private reply) still pools into the mean (``n * mean`` is its sum); the
    pooled sd is then None (not available), never a partial one.
    """
    nonempty = [d for d in parts if d.n > 0]
    if not nonempty:
        return Distribution(n=0)
    if len(nonempty) == 1:
        return nonempty[0]
    moments: list[tuple[int, float, float | None]] = []  # n, mean, sd (0 for a single value)
    for d in nonempty:
        if d.mean is None:
            raise ValueError(f"cannot pool a distribution of n={d.n} without its mean: {d}")
        moments.append((d.n, d.mean, 0.0 if d.n < 2 else d.sd))
    n = sum(k for k, _, _ in moments)
    mean = sum(k * m for k, m, _ in moments) / n
    if any(sd is None for _, _, sd in moments):
        return Distribution(n=n, mean=mean)
    ss = sum((k - 1) * (sd or 0.0) ** 2 + k * (m - mean) ** 2 for k, m, sd in moments)
    return Distribution(n=n, mean=mean, sd=math.sqrt(ss / (n - 1)))


def has_bins(scores: ClassScores) -> bool:
    """Whether ``scores`` holds every IoU bin (a site's policy empties them to suppress them)."""
    return scores.bins.keys() >= set(IOU_BINS)


def pool_class_scores(parts: Sequence[ClassScores]) -> ClassScores:
    """Pool one class across sites: bins, undefined and pixel counts add; IoU/Dice via
    :func:`pool_distributions` (n, mean, sd exact; median/quartiles None).

    Bins add over the parts that hold every bin; a part without them (suppressed) adds
    nothing, and when no part has them the pooled bins are empty (not available), never 0.
    Which sites that leaves out is :func:`pool_payloads`'s coverage.
    """
    binned = [p for p in parts if has_bins(p)]
    bins = {name: sum(p.bins[name] for p in binned) for name in IOU_BINS} if binned else {}
    return ClassScores(
        bins=bins,
        undefined=sum(p.undefined for p in parts),
        iou=pool_distributions([p.iou for p in parts]),
        dice=pool_distributions([p.dice for p in parts]),
        intersection_px=sum(p.intersection_px for p in parts),
        union_px=sum(p.union_px for p in parts),
    )


def _sum_or_none(values: Iterable[float | None]) -> float | None:
    """The sum, or None when any part withheld its value (never a partial sum)."""
    out = 0.0
    for v in values:
        if v is None:
            return None
        out += v
    return out


def _pool_moments(n: int, sum_diff: float, sum_sq_diff: float | None) -> tuple[float | None, float | None]:
    """Mean and sd of ``n`` pooled values from their sums (:func:`common.stats.mean_interval`);
    the sd is None without a sum of squares (a differentially private reply sends none)."""
    if sum_sq_diff is None:
        return (sum_diff / n if n else None), None
    moments = mean_interval(n, sum_diff, sum_sq_diff)
    return moments.mean, moments.sd


def _weighted_mean(pairs: Iterable[tuple[int, float | None]]) -> float | None:
    known = [(n, v) for n, v in pairs if v is not None and n > 0]
    total = sum(n for n, _ in known)
    return sum(n * v for n, v in known) / total if total else None


def pool_area_agreement(parts: Sequence[AreaAgreement]) -> AreaAgreement:
    """Pool one tissue's area agreement across sites.

    Exact for n, means of areas, mean and sd of the differences (from ``sum_diff`` and
    ``sum_sq_diff``). Mean HU is weighted by each part's n, which is exact only when the
    tissue is present on every slice (the payload does not carry how many slices had it).
    """
    n = sum(p.n for p in parts)
    sum_diff = sum(p.sum_diff_cm2 for p in parts)
    sum_sq = _sum_or_none(p.sum_sq_diff_cm2 for p in parts)
    mean_diff, sd_diff = _pool_moments(n, sum_diff, sum_sq)
    return AreaAgreement(
        n=n,
        mean_label_cm2=_weighted_mean((p.n, p.mean_label_cm2) for p in parts),
        mean_test_cm2=_weighted_mean((p.n, p.mean_test_cm2) for p in parts),
        mean_diff_cm2=mean_diff,
        sd_diff_cm2=sd_diff,
        sum_diff_cm2=sum_diff,
        sum_sq_diff_cm2=sum_sq,
        mean_hu_label=_weighted_mean((p.n, p.mean_hu_label) for p in parts),
        mean_hu_test=_weighted_mean((p.n, p.mean_hu_test) for p in parts),
    )


def pool_smi_agreement(parts: Sequence[SmiAgreement]) -> SmiAgreement:
    """Pool SMI agreement across sites, exactly (from ``sum_diff`` and ``sum_sq_diff``)."""
    n = sum(p.n for p in parts)
    sum_diff = sum(p.sum_diff for p in parts)
    sum_sq = _sum_or_none(p.sum_sq_diff for p in parts)
    mean_diff, sd_diff = _pool_moments(n, sum_diff, sum_sq)
    return SmiAgreement(
        n=n,
        mean_label=_weighted_mean((p.n, p.mean_label) for p in parts),
        mean_test=_weighted_mean((p.n, p.mean_test) for p in parts),
        mean_diff=mean_diff,
        sd_diff=sd_diff,
        sum_diff=sum_diff,
        sum_sq_diff=sum_sq,
    )


def pool_sarcopenia(parts: Sequence[SarcopeniaConfusion]) -> SarcopeniaConfusion | None:
    """Add sarcopenia confusion counts; all parts must use the same cut-off set."""
    if not parts:
        return None
    sets = sorted({p.cutoff_set for p in parts})
    if len(sets) > 1:
        raise ValueError(f"cannot pool sarcopenia calls made with different cut-off sets: {sets}")
    return SarcopeniaConfusion(
        cutoff_set=sets[0],
        both_sarcopenic=sum(p.both_sarcopenic for p in parts),
        label_only=sum(p.label_only for p in parts),
        test_only=sum(p.test_only for p in parts),
        neither=sum(p.neither for p in parts),
        unknown=sum(p.unknown for p in parts),
    )


def limits_of_agreement(mean: float | None, sd: float | None) -> tuple[float, float] | None:
    """Bland-Altman limits of agreement, mean +- 1.96 sd (None without an sd)."""
    if mean is None or sd is None:
        return None
    return mean - LOA_Z * sd, mean + LOA_Z * sd


# --------------------------------------------------------------------------- the study


def usable_sites(report: StudyReport) -> list[SiteResult]:
    """The sites whose status is ok and that scored at least one slice, in report order."""
    return [s for s in report.sites if s.status == "ok" and s.payload is not None and s.payload.n_used > 0]


def usable_payloads(report: StudyReport) -> dict[str, EvaluationPayload]:
    """Site -> payload for the :func:`usable_sites`."""
    return {s.site: s.payload for s in usable_sites(report) if s.payload is not None}


def withheld_paths(payload: EvaluationPayload) -> set[str]:
    """Payload paths of the pooled values this site did not send.

    Those its release policy names in ``suppressed`` (``scores.muscle.bins``, ``areas.muscle``,
    ``smi``, ...), and those absent without a mark: a class or tissue missing, bins
    incomplete, no SMI, no sarcopenia calls, no harmonised scores, no raw scores (evaluate).
    """
    paths = {mark for mark in payload.suppressed if mark.split(".")[0] in POOLED_FIELDS}
    scored = [("scores", payload.scores), ("harmonised_scores", payload.harmonised_scores)]
    if payload.task == "evaluate":  # a comparison of label sets has no raw prediction
        scored.append(("raw_scores", payload.raw_scores))
    for field, scores in scored:
        if scores is None:
            paths.add(field)
            continue
        for cls in METRIC_CLASSES:
            if cls not in scores:
                paths.add(f"{field}.{cls}")
            elif not has_bins(scores[cls]):
                paths.add(f"{field}.{cls}.bins")
    paths |= {f"areas.{t}" for t in TISSUES if t not in payload.areas}
    if payload.smi is None:
        paths.add("smi")
    if payload.sarcopenia is None:
        paths.add("sarcopenia")
    return paths


def payloads_role(payloads: Mapping[str, EvaluationPayload]) -> Role | None:
    """The one role of these payloads; ValueError when they mix roles (never pooled together)."""
    roles = {p.role for p in payloads.values()}
    if len(roles) > 1:
        by_role = {
            str(r): sorted(s for s, p in payloads.items() if p.role == r) for r in ROLE_ORDER if r in roles
        }
        raise ValueError(
            f"internal and external sites are pooled separately, never together; got {by_role}: "
            "pool each role with pool_by_role"
        )
    return next(iter(roles), None)


def pool_raw_scores(payloads: Sequence[EvaluationPayload]) -> dict[str, ClassScores] | None:
    """Pool the raw prediction's scores over the sites that sent each class (None when none did);
    :func:`withheld_paths` names the sites left out."""
    sent = [p.raw_scores for p in payloads if p.raw_scores]
    if not sent:
        return None
    return {
        c: pool_class_scores([s[c] for s in sent if c in s])
        for c in METRIC_CLASSES
        if any(c in s for s in sent)
    }


def pool_payloads(payloads: Mapping[str, EvaluationPayload]) -> PooledResults:
    """Pool the payloads of several sites of one role (site -> payload), with what each site withheld.

    Raises ValueError when the payloads mix roles: use :func:`pool_by_role`.
    """
    role = payloads_role(payloads)
    parts = list(payloads.values())
    excluded: Counter[str] = Counter()
    for p in parts:
        excluded.update(p.excluded)
    smi_parts = [p.smi for p in parts if p.smi is not None]
    sarc = [p.sarcopenia for p in parts if p.sarcopenia is not None]
    harmonised = None
    if parts and all(p.harmonised_scores for p in parts):
        harmonised = {
            c: pool_class_scores([p.harmonised_scores[c] for p in parts])  # type: ignore[index]
            for c in METRIC_CLASSES
            if all(c in p.harmonised_scores for p in parts)  # type: ignore[operator]
        }
    withheld: dict[str, list[str]] = {}
    for site, p in payloads.items():
        for path in sorted(withheld_paths(p)):
            withheld.setdefault(path, []).append(site)
    return PooledResults(
        role=role,
        sites=list(payloads),
        n_listed=sum(p.n_listed for p in parts),
        n_used=sum(p.n_used for p in parts),
        n_groups=sum(p.n_groups for p in parts),
        excluded=dict(excluded),
        scores={c: pool_class_scores([p.scores[c] for p in parts if c in p.scores]) for c in METRIC_CLASSES},
        areas={t: pool_area_agreement([p.areas[t] for p in parts if t in p.areas]) for t in TISSUES},
        smi=pool_smi_agreement(smi_parts) if smi_parts else None,
        sarcopenia=pool_sarcopenia(sarc) if len({s.cutoff_set for s in sarc}) == 1 else None,
        harmonised_scores=harmonised,
        raw_scores=pool_raw_scores(parts),
        withheld=dict(sorted(withheld.items())),
    )


def split_by_role(
    payloads: Mapping[str, EvaluationPayload],
) -> dict[Role | None, dict[str, EvaluationPayload]]:
    """Role -> its payloads (site order kept), in :data:`ROLE_ORDER`; roles without a site left out."""
    groups = {role: {s: p for s, p in payloads.items() if p.role == role} for role in ROLE_ORDER}
    return {role: group for role, group in groups.items() if group}


def pool_by_role(payloads: Mapping[str, EvaluationPayload]) -> list[PooledResults]:
    """One pooled result per role (internal, external, no role), each over its own sites only."""
    return [pool_payloads(group) for group in split_by_role(payloads).values()]


def pool_report(report: StudyReport) -> list[PooledResults]:
    """The report's usable payloads pooled by role (empty when no site sent a usable result)."""
    return pool_by_role(usable_payloads(report))


# --------------------------------------------------------------------------- model error profile


def pool_key_stats(parts: Sequence[dict[str, KeyStats]]) -> dict[str, KeyStats]:
    """Add sufficient statistics across sites, kind by kind (exact)."""
    out: dict[str, KeyStats] = {}
    for part in parts:
        for key, s in part.items():
            old = out.get(key)
            out[key] = (
                s
                if old is None
                else KeyStats(
                    n=old.n + s.n,
                    n_present=old.n_present + s.n_present,
                    sum_net_share=old.sum_net_share + s.sum_net_share,
                    sum_sq_net_share=old.sum_sq_net_share + s.sum_sq_net_share,
                    sum_net_cm2=old.sum_net_cm2 + s.sum_net_cm2,
                    sum_sq_net_cm2=old.sum_sq_net_cm2 + s.sum_sq_net_cm2,
                )
            )
    return out


def error_profile(
    parts: Mapping[str, tuple[int, dict[str, KeyStats]]],
    source: str,
    *,
    withheld: Mapping[str, str] | None = None,
    withheld_keys: Mapping[str, Sequence[str]] | None = None,
) -> ErrorProfile:
    """The model's error profile from internal sites: site -> (slices analysed, key stats).

    ``withheld``: internal sites left out, and why (their statistics were not sent);
    ``withheld_keys``: kind -> the sites that withheld that kind only. Both are kept in the
    profile, so every comparison with it can say what it is not pooled over.
    """
    return ErrorProfile(
        source=source,
        n_sites=len(parts),
        n_slices=sum(n for n, _ in parts.values()),
        key_stats=pool_key_stats([stats for _, stats in parts.values()]),
        withheld=dict(sorted((withheld or {}).items())),
        withheld_keys={k: sorted(v) for k, v in sorted((withheld_keys or {}).items())},
    )
