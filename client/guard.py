"""The site guard: what the ClientApp must pass through before anything leaves the site.

One ``SiteGuard`` per incoming message (``open_guard``). It audits the instruction,
refuses it when the site's policy, app allow-list or the instruction itself says no, is
then given the site the ClientApp parsed (``SiteGuard.attach``: the file names and group
keys to screen for come from that one ``SiteDataset``), and releases replies only after
enforcing the policy on them:

- evaluation payloads (:func:`policy_release`, also the ``site evaluate | compare`` preview):
  at least ``min-slices`` usable slices and ``min-patients`` patients, not almost the same
  patients as an earlier reply (the release ledger); medians and quartiles withheld; cells
  with a count below ``min-cell-count`` suppressed *and named* in ``suppressed`` (never
  silently zeroed), or with ``[aggregate-dp]`` the differentially private release within the
  epsilon budgets; polar maps and discrepancy analysis removed when not allowed; the result
  re-validated through ``EvaluationPayload`` so only schema fields leave; no file name or
  group key from manifest.csv anywhere in the text (error reasons: redacted instead);
- training replies: only the metric keys of ``protocols.keys.TRAIN_METRIC_KEYS``, finite
  values, at least ``min-slices`` training slices, local DP when the policy demands it;
  validation metrics only over ``[training] min-val-patients`` / ``min-val-slices``
  (otherwise withheld and marked ``val-withheld``); DP-SGD with its epsilon when ``[dp-sgd]``
  demands it (a study model without BatchNorm and a planned epsilon within ``max-epsilon``,
  checked before training; the training loss then stays at the site); convention-aware
  adjustments as pooled shares only, each applied on at least ``min-slices`` training slices
  (otherwise withheld and marked ``convention-withheld``);
- every instruction: run-config values inside the site's ``[bounds]``.

Every refusal and every reply sent is appended to the site's audit log first.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from pydantic import ValidationError

from client.allowlist import app_refusal, current_app_hash
from client.audit import AuditLog
from client.audit_anchor import AuditLogError
from client.ledger import ReleaseLedger
from client.policy import SitePolicy, load_policy
from client.redact import redact
from common.dataset import IDENTIFYING_COLUMNS, SiteDataset
from common.errors import SarcofedError, SiteFolderError
from common.evaluation import SliceRecord, patients_of
from protocols import keys
from protocols.compute import ComputeUsed
from protocols.model import ModelSpec
from protocols.payloads import AreaAgreement, ClassScores, Distribution, EvaluationPayload
from protocols.study import StudyConfig, TrainSection

log = logging.getLogger(__name__)

#: Tasks every site answers whatever its policy: the site's pseudonym and row count.
ALWAYS_ACCEPTED: tuple[str, ...] = ("identify",)
#: Strings from manifest.csv shorter than this are not searched for in replies (too common).
MIN_IDENTIFIER_LEN = 6
#: The reason a site gives when it cannot audit: it then answers nothing (what failed stays in its log).
AUDIT_UNAVAILABLE = "this site cannot write its audit log, so it answers nothing until the site fixes it"
#: Training metrics a DP-SGD site keeps: the private steps' loss is an exact function of the
#: training slices that the round's epsilon does not cover (the weights are what DP-SGD protects).
NOT_PRIVATE_UNDER_DP_SGD: frozenset[str] = frozenset({keys.TRAIN_LOSS, keys.TRAIN_LOSS_SUM})


class SiteRefusal(Exception):
    """The site refuses an instruction or a reply; ``reason`` is what the coordinator sees."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def allowed_config_keys() -> frozenset[str]:
    """Instruction keys plus the study's run-config keys: nothing else may be asked of a site."""
    return keys.INSTRUCTION_KEYS | frozenset(StudyConfig.valid_keys())


def config_refusal(config: Mapping[str, object]) -> str | None:
    """Why an instruction's config is refused (``None`` = acceptable).

    Allow-list, not deny-list: a key the study protocol does not define (``per-slice``,
    ``return-file-names``, ``patient-ids`` ...) is refused by name, as is any value that is
    not a plain bool/int/float/str.
    """
    allowed = allowed_config_keys()
    unknown = sorted(str(k) for k in config if k not in allowed)
    if unknown:
        return (
            f"the instruction asks for {', '.join(repr(k) for k in unknown)}, which is not part of the "
            "sarcofed study protocol (a site never sends per-slice values, identifiers or file names)"
        )
    for key, value in config.items():
        if not isinstance(value, bool | int | float | str):
            kind = type(value).__name__
            return f"instruction key {key!r} holds a {kind}; only bool/int/float/str are accepted"
    return None


def bounds_refusal(policy: SitePolicy, study: StudyConfig) -> str | None:
    """Why the study's run config is outside the site's ``[bounds]`` (``None`` = inside them).

    Checked on the study as the site parsed it (run config and instruction together), so a
    value set either way is bounded.
    """
    flat = study.to_flat()
    for key, (low, high) in sorted(policy.bounds.items()):
        value = flat[key]
        if not low <= float(value) <= high:
            return (
                f"run-config {key} = {value:g} is outside this site's bounds [{low:g}, {high:g}] "
                f"([bounds] in policy.toml); set {key} between {low:g} and {high:g}"
            )
    return None


def withhold_conventions(
    metrics: Mapping[str, float], policy: SitePolicy
) -> tuple[dict[str, float], list[str]]:
    """The training metrics without the convention-aware adjustments applied on fewer training
    slices than the policy's ``min-slices`` (a share over one or two slices is one patient's
    anatomy), and the names of those withheld (the reply is then marked ``convention-withheld``)."""
    out = dict(metrics)
    withheld = []
    for name in keys.CONVENTION_TALLIES:
        share_key, slices_key = keys.convention_keys(name)
        if share_key not in out and slices_key not in out:
            continue
        if int(out.get(slices_key, 0)) < policy.min_slices:
            out.pop(share_key, None)
            out.pop(slices_key, None)
            # a declaration left without its share would read as "declared, not confirmed"
            out.pop(keys.convention_declared_key(name), None)
            withheld.append(name)
    if withheld:
        out[keys.CONVENTION_WITHHELD] = 1.0
    return out, withheld


def withheld_validation(metrics: Mapping[str, float], policy: SitePolicy) -> str | None:
    """Why the validation metrics of a training reply may not leave (``None`` = they may).

    They are sums over the validation patients' slices; with one patient they are that
    patient's pixel counts and loss (``train.val-fraction`` and ``train.seed`` choose how
    many and whom), so they leave only over ``min-val-patients`` patients and
    ``min-val-slices`` slices. A reply that does not say its patient count is withheld too.
    """
    if not any(key in metrics for key in keys.VAL_METRIC_KEYS):
        return None
    patients = int(metrics.get(keys.N_VAL_PATIENTS, 0))
    slices = int(metrics.get(keys.N_VAL, 0))
    need_patients, need_slices = policy.training.min_val_patients, policy.min_val_slices
    if patients >= need_patients and slices >= need_slices:
        return None
    return (
        f"the validation split holds {patients} patient(s) and {slices} slice(s); this site releases "
        f"validation metrics over at least {need_patients} patients and {need_slices} slices "
        "(min-val-patients / min-val-slices in policy.toml [training]); raise train.val-fraction"
    )


def never_leave(site: SiteDataset) -> frozenset[str]:
    """The strings of a parsed site that no reply may contain: manifest paths, file names, group keys.

    Taken from the ``SiteDataset`` the site's tasks run on (valid rows and the raw cells of
    invalid ones), so the screen sees exactly what the dataset read, whatever the manifest's
    separator or header case. Strings shorter than ``MIN_IDENTIFIER_LEN`` are left out.
    """
    found: set[str] = set()
    for column in IDENTIFYING_COLUMNS:
        for value in site.listed(column):
            if column == "group":  # whole values only: a stem like "muscle" is also a class name
                candidates = {value}
            else:
                candidates = {value, Path(value).name, PurePosixPath(value.replace("\\", "/")).name}
            found |= {c for c in candidates if len(c) >= MIN_IDENTIFIER_LEN}
    return frozenset(found)


def names_any(text: str, strings: Collection[str]) -> bool:
    """Whether ``text`` contains one of ``strings`` (any case): a manifest string about to leave."""
    lowered = text.lower()
    return any(value.lower() in lowered for value in strings)


def _small(count: int | None, k: int) -> bool:
    return count is not None and 0 < count < k


#: Marks that medians and quartiles were withheld (they are order statistics: the values of
#: individual slices; with n, mean and sd they give back every value of a small site).
QUANTILES_MARK = "quantiles"
#: The payload fields that hold per-class scores (``protocols.payloads.ClassScores``).
SCORE_FIELDS: tuple[str, ...] = ("scores", "raw_scores", "harmonised_scores")


def _withhold_quantiles(data: dict[str, Any]) -> bool:
    """Drop median / q1 / q3 from every distribution of a payload dict; whether any was there."""
    found = False
    for field in SCORE_FIELDS:
        for scores in (data.get(field) or {}).values():
            for dist in ("iou", "dice"):
                values = scores.get(dist) or {}
                for q in ("median", "q1", "q3"):
                    if values.get(q) is not None:
                        values[q] = None
                        found = True
    return found


def release_refusal(
    payload: EvaluationPayload,
    patients: Collection[str],
    policy: SitePolicy,
    ledger: ReleaseLedger,
    run_id: int | None = None,
) -> str | None:
    """Why the site refuses to release this payload at all (``None``: it may leave, after suppression).

    Too few slices or patients; without differential privacy, a patient set that differs from
    an earlier release's by at least one and fewer than ``min-patients`` patients (one
    patient's values would follow by subtraction, ``n2 * mean2 - n1 * mean1``); with it, a
    reply that would exceed the study's or the site's epsilon budget.
    """
    if payload.n_used < policy.min_slices:
        return (
            f"only {payload.n_used} usable slice(s); this site's policy releases results over at "
            f"least {policy.min_slices} (min-slices in policy.toml)"
        )
    n_patients = len(set(patients))
    if n_patients < policy.min_patients:
        return (
            f"the {payload.n_used} usable slice(s) come from only {n_patients} patient(s); this site's "
            f"policy releases results over at least {policy.min_patients} patients (min-patients in "
            "policy.toml)"
        )
    dp = policy.aggregate_dp
    if dp.enabled:
        study = ledger.spent(run_id) if run_id is not None else 0.0
        total = ledger.spent()
        if study + dp.epsilon_per_reply > dp.epsilon_per_study + 1e-12:
            return (
                "this reply would take the study's privacy loss to epsilon "
                f"{study + dp.epsilon_per_reply:g}; "
                f"this site's policy allows {dp.epsilon_per_study:g} per study (epsilon-per-study in "
                "[aggregate-dp] of policy.toml)"
            )
        if total + dp.epsilon_per_reply > dp.epsilon_total + 1e-12:
            return (
                f"this site has released epsilon {total:g} with differential privacy; one more reply would "
                f"exceed its total budget of {dp.epsilon_total:g} (epsilon-total in [aggregate-dp] of "
                "policy.toml): nothing more is released"
            )
        return None
    earlier = ledger.too_close(patients, policy.min_patients)
    if earlier is not None:
        return (
            f"this reply would summarise almost the same patients as the {earlier.task} reply this site "
            f"sent in run {earlier.run_id} ({earlier.time}): fewer than {policy.min_patients} patients "
            "(min-patients in policy.toml) differ, so a patient's values would follow by subtraction; "
            "the same patients, or at least that many more or fewer, may be released"
        )
    return None


def suppress_payload(payload: EvaluationPayload, policy: SitePolicy) -> tuple[dict[str, Any], list[str]]:
    """Apply the policy to a payload: the payload as a dict, and the names of what was suppressed.

    Quantiles always, and the discrepancy analysis and polar maps as the policy says. A table
    with any cell below ``min-cell-count`` is suppressed whole (a single cell could otherwise
    be recovered from the total), except under ``[aggregate-dp]``: the DP release
    (``client.dp_release``) then noises every count it sends and withholds the rest, so a
    small cell is covered by the noise, and suppressing it here would mark withheld a table
    the DP release sends.
    """
    k = policy.min_cell_count
    data = payload.model_dump(mode="json", by_alias=True)
    marks: list[str] = []
    if _withhold_quantiles(data):
        marks.append(QUANTILES_MARK)

    if not policy.accepts("discrepancy"):
        if data.get("discrepancy") is not None:
            data["discrepancy"] = None
            marks.append("discrepancy")
        if data.get("findings"):
            data["findings"] = []
            marks.append("findings")
        if data.get("label_audit") is not None:
            data["label_audit"] = None
            marks.append("label_audit")
    disc = data.get("discrepancy")
    if disc is not None and disc.get("polar") is not None:
        if not policy.allow_polar_maps:
            disc["polar"] = None
            marks.append("discrepancy.polar")
        elif _small(disc["polar"].get("n_slices"), k):
            disc["polar"] = None
            marks.append("discrepancy.polar")
    if k <= 1 or policy.aggregate_dp.enabled:
        return data, marks

    for field in SCORE_FIELDS:
        for name, scores in (data.get(field) or {}).items():
            parsed = ClassScores.model_validate(scores)
            if any(_small(c, k) for c in parsed.bins.values()):
                scores["bins"] = {}
                marks.append(f"{field}.{name}.bins")
            if _small(parsed.undefined, k):
                scores["undefined"] = 0
                marks.append(f"{field}.{name}.undefined")
            for dist in ("iou", "dice"):
                if _small(getattr(parsed, dist).n, k):
                    scores[dist] = Distribution(n=0).model_dump(mode="json")
                    marks.append(f"{field}.{name}.{dist}")
    if any(_small(c, k) for c in data.get("excluded", {}).values()):
        data["excluded"] = {}
        marks.append("excluded")
    for name, area in (data.get("areas") or {}).items():
        if _small(area.get("n"), k):
            data["areas"][name] = AreaAgreement(n=0).model_dump(mode="json")
            marks.append(f"areas.{name}")
    if data.get("smi") is not None and _small(data["smi"].get("n"), k):
        data["smi"] = None
        marks.append("smi")
    sarc = data.get("sarcopenia")
    if sarc is not None and any(_small(v, k) for n, v in sarc.items() if n != "cutoff_set"):
        data["sarcopenia"] = None
        marks.append("sarcopenia")
    if "findings" in data:
        data["findings"] = _drop_small(data["findings"], k, "findings", marks)
    if disc is not None and "findings" in disc:
        disc["findings"] = _drop_small(disc["findings"], k, "discrepancy.findings", marks)
    if disc is not None:
        for key, stats in list((disc.get("key_stats") or {}).items()):
            if _small(stats.get("n"), k):
                del disc["key_stats"][key]
                marks.append(f"discrepancy.key_stats.{key}")
    audit = data.get("label_audit")
    if audit is not None:
        audit["checks"] = _drop_small(audit.get("checks"), k, "label_audit", marks)
    return data, marks


def _drop_small(
    items: list[dict[str, Any]] | None, k: int, prefix: str, marks: list[str]
) -> list[dict[str, Any]]:
    """The findings (or label-audit checks) over at least ``k`` slices; each dropped one is marked
    ``<prefix>.<class>:<direction>:<region>``."""
    kept = []
    for item in items or []:
        if _small(item.get("n_slices"), k):
            marks.append(f"{prefix}.{item['class']}:{item['direction']}:{item['region']}")
        else:
            kept.append(item)
    return kept


@dataclass(frozen=True)
class Release:
    """An evaluation / comparison reply as the site's policy would send it."""

    payload: EvaluationPayload
    #: the differential-privacy loss it spends (0 without ``[aggregate-dp]``)
    epsilon: float
    #: why the site would not send it at all (``release_refusal``); ``None``: it may leave
    refusal: str | None


def policy_release(
    scored: EvaluationPayload,
    records: Sequence[SliceRecord],
    policy: SitePolicy,
    ledger: ReleaseLedger,
    run_id: int | None = None,
) -> Release:
    """Apply the site's release policy to a scored payload: the one place it is applied.

    Refusal (:func:`release_refusal`), quantiles, discrepancy and small cells
    (:func:`suppress_payload`), the DP release when ``[aggregate-dp]`` is on
    (``client.dp_release``), every mark in ``suppressed``, re-validated through
    ``EvaluationPayload`` so only schema fields leave. Pure apart from the DP noise: nothing is
    recorded. ``SiteGuard.release_payload`` adds the screening, the audit and the ledger;
    ``sarcofed site evaluate | compare`` show its payload (and its refusal) as the preview.
    ``records``: the per-slice records the payload was computed from (they stay at the site).
    Raises ``pydantic.ValidationError`` when the result does not fit the payload schema.
    """
    refusal = release_refusal(scored, patients_of(records), policy, ledger, run_id)
    data, marks = suppress_payload(scored, policy)
    epsilon = 0.0
    dp = policy.aggregate_dp
    if dp.enabled:
        from client.dp_release import private_payload

        data, dp_marks, info = private_payload(
            data,
            records,
            epsilon=dp.epsilon_per_reply,
            max_per_patient=dp.max_slices_per_patient,
            cutoff_set=scored.sarcopenia.cutoff_set if scored.sarcopenia else None,
        )
        marks += dp_marks
        data["dp"] = info.model_dump(mode="json")
        epsilon = info.epsilon
    data["suppressed"] = list(dict.fromkeys([*data.get("suppressed", []), *marks]))
    return Release(EvaluationPayload.model_validate(data), epsilon, refusal)


@dataclass
class SiteGuard:
    """Policy enforcement and audit for one incoming message.

    The ClientApp parses the site once and hands the ``SiteDataset`` to :meth:`attach`;
    from then on replies are screened for its file names and group keys. A guard with no
    site attached (the folder could not be parsed) still redacts the site's path from error
    reasons, and refuses to release an evaluation payload (it could not screen it).
    """

    site_dir: Path
    policy: SitePolicy
    audit: AuditLog
    app_hash: str
    run_id: int
    task: str
    #: What no reply may contain (:func:`never_leave`); ``None`` until a site is attached.
    identifiers: frozenset[str] | None = None

    def attach(self, site: SiteDataset) -> SiteDataset:
        """Screen everything that leaves for ``site``'s manifest strings; returns ``site``."""
        self.identifiers = never_leave(site)
        return site

    def _screen(self) -> frozenset[str]:
        if self.identifiers is None:
            raise self._refuse("the reply cannot be screened: the site guard was given no parsed site")
        return self.identifiers

    def _sent(self, payload: Any) -> None:
        self.audit.append("sent", run_id=self.run_id, task=self.task, app_hash=self.app_hash, payload=payload)

    def refuse(self, reason: str) -> None:
        """Record a refusal (the caller replies with an error carrying ``reason``)."""
        log.warning("site refuses %s (run %s): %s", self.task, self.run_id, reason)
        self.audit.append(
            "refused", run_id=self.run_id, task=self.task, app_hash=self.app_hash, detail=reason
        )

    def error_reason(self, reason: str) -> str:
        """An error reason as it may leave (``client.redact.redact``: no path, no file name), audited.

        The reason as it was, paths and all, goes to the site's own log only.
        """
        safe = redact(reason, self.site_dir, self.identifiers or ())
        if safe != reason:
            log.warning("site %s: %s (run %s) failed: %s", self.site_dir, self.task, self.run_id, reason)
        self.refuse(safe)
        return safe

    def _refuse(self, reason: str) -> SiteRefusal:
        self.refuse(reason)
        return SiteRefusal(reason)

    def release_payload(
        self, payload: EvaluationPayload, *, records: Sequence[SliceRecord]
    ) -> EvaluationPayload:
        """The payload as it may leave: policy applied, re-validated, audited, recorded.

        ``records``: the per-slice records the payload was computed from (kept at the site):
        the release ledger stores keyed hashes of their patients, and a DP release is computed
        from them.
        """
        if not isinstance(payload, EvaluationPayload):
            raise self._refuse(f"reply is a {type(payload).__name__}, not an EvaluationPayload")
        ledger = ReleaseLedger.for_site(self.site_dir)
        try:
            release = policy_release(payload, records, self.policy, ledger, self.run_id)
        except ValidationError as err:
            raise self._refuse(
                f"reply does not fit the payload schema after the site's policy: {err}"
            ) from err
        if release.refusal:
            raise self._refuse(release.refusal)
        released = release.payload
        text = released.model_dump_json()
        if names_any(text, self._screen()):
            raise self._refuse("reply contains a file name or group key from manifest.csv; nothing was sent")
        self._sent(json.loads(text))
        ledger.record(
            run_id=self.run_id, task=self.task, patients=patients_of(records), epsilon=release.epsilon
        )
        return released

    def check_training(self, spec: ModelSpec, train: TrainSection, n_train: int) -> None:
        """Refuse (``SiteRefusal``, audited) a training instruction this site's policy cannot serve,
        before any model is built: DP-SGD required and a study model with BatchNorm, which DP-SGD
        cannot train, or a round whose DP-SGD is planned to spend more than ``max-epsilon``.

        ``n_train``: the rows of the site's train split (``client.site_tasks.n_train_rows``). A row
        that turns out unusable makes the round's epsilon a little larger than planned: the
        epsilon actually spent is checked again on the reply (:meth:`release_weights`).
        """
        dp = self.policy.dp_sgd
        if not dp.enabled:
            return
        if spec.norm != "group":
            raise self._refuse(
                f"this site trains only with DP-SGD ([dp-sgd] in policy.toml), which cannot train a "
                f"model with BatchNorm (model.norm = {spec.norm!r}: BatchNorm mixes the slices of a "
                "batch and keeps statistics of them); run the study with model.norm = 'group'"
            )
        from common.dp_sgd import PrivateTraining, planned_epsilon

        private = PrivateTraining(dp.noise_multiplier, dp.max_grad_norm, dp.target_delta)
        planned = planned_epsilon(private, n_train, train.batch_size, train.local_epochs)
        if planned > dp.max_epsilon:
            raise self._refuse(
                f"this round's DP-SGD would spend epsilon {planned:.3g} (delta {dp.target_delta:g}: "
                f"{train.local_epochs} local epoch(s) of batch {train.batch_size} over {n_train} training "
                f"slices), more than this site's max-epsilon {dp.max_epsilon:g} ([dp-sgd] in "
                "policy.toml); lower train.local-epochs or train.batch-size (a smaller sampling rate "
                "per step), or the site raises noise-multiplier"
            )

    def release_weights(
        self,
        n_train: int,
        weights_sha256: str,
        metrics: Mapping[str, float],
        *,
        dp_applied: bool = False,
        compute: ComputeUsed | None = None,
    ) -> dict[str, float]:
        """The training metrics as they may leave (allow-listed keys, finite values), audited.

        ``compute``: the device and precision the site trained on, which the reply also says
        (it is audited with the metrics).

        Validation metrics over fewer patients or slices than the policy's minimums are
        withheld and the reply marked ``val-withheld`` (the weights still leave); a reply the
        policy's DP-SGD does not cover, or that spent more than ``max-epsilon``, is refused.
        Under DP-SGD the training loss stays at the site (:data:`NOT_PRIVATE_UNDER_DP_SGD`).
        """
        allowed = set(keys.TRAIN_METRIC_KEYS)
        extra = sorted(k for k in metrics if k not in allowed)
        if extra:
            raise self._refuse(f"training reply has metric(s) {extra} outside the protocol's allow-list")
        released: dict[str, float] = {}
        for key, value in metrics.items():
            number = float(value)
            if not math.isfinite(number):
                raise self._refuse(f"training metric {key!r} is {value}; only finite numbers leave")
            released[key] = number
        if n_train < self.policy.min_slices:
            raise self._refuse(
                f"trained on only {n_train} slice(s); this site's policy releases weights trained on at "
                f"least {self.policy.min_slices} (min-slices in policy.toml)"
            )
        dp = self.policy.weights_dp
        if dp.enabled and not dp_applied:
            raise self._refuse(
                "this site's policy requires local DP on weights, and the update was not privatised"
            )
        dp_sgd = self.policy.dp_sgd
        if dp_sgd.enabled:
            epsilon = released.get(keys.DP_EPSILON)
            if epsilon is None:
                raise self._refuse(
                    "this site's policy requires DP-SGD ([dp-sgd] in policy.toml), and the training "
                    "was not private"
                )
            if epsilon > dp_sgd.max_epsilon:
                raise self._refuse(
                    f"this round's DP-SGD spent epsilon {epsilon:.3g} (delta {dp_sgd.target_delta:g}), "
                    f"more than this site's max-epsilon {dp_sgd.max_epsilon:g} ([dp-sgd] in policy.toml); "
                    "lower train.local-epochs or train.batch-size (a smaller sampling rate per step), "
                    "or the site raises noise-multiplier"
                )
            released = {k: v for k, v in released.items() if k not in NOT_PRIVATE_UNDER_DP_SGD}
        released, small_conventions = withhold_conventions(released, self.policy)
        if small_conventions:
            log.warning(
                "site withholds convention-aware adjustment(s) %s (run %s): fewer than min-slices slices",
                small_conventions,
                self.run_id,
            )
        withheld = withheld_validation(released, self.policy)
        if withheld:
            log.warning("site withholds validation metrics (run %s): %s", self.run_id, withheld)
            released = {k: v for k, v in released.items() if k not in keys.VAL_METRIC_KEYS}
            released[keys.VAL_WITHHELD] = 1.0
        self._sent(
            {
                "n_train": int(n_train),
                "weights_sha256": weights_sha256,
                "metrics": released,
                "weights_dp": dp.model_dump() if dp.enabled else None,
                "dp_sgd": dp_sgd.model_dump() if dp_sgd.enabled else None,
                "validation_withheld": withheld,
                "compute": compute.model_dump() if compute is not None else None,
            }
        )
        return released

    def release_identity(self, site: str, n_listed: int) -> dict[str, object]:
        """The ``identify`` reply (site pseudonym, manifest row count), audited."""
        reply: dict[str, object] = {"site": site, "n_listed": int(n_listed)}
        self._sent(reply)
        return reply

    def protect_update(
        self, update: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, bool]:
        """Local DP when the policy asks for it: clip the update's L2 norm, add Gaussian noise.

        ``update`` is new weights minus the global weights (one packed float array).
        Returns the update to add back and whether DP was applied.
        """
        dp = self.policy.weights_dp
        if not dp.enabled:
            return update, False
        return clip_and_noise(
            update, dp.clipping_norm, dp.noise_multiplier, rng or np.random.default_rng()
        ), True


def clip_and_noise(
    update: np.ndarray, clipping_norm: float, noise_multiplier: float, rng: np.random.Generator
) -> np.ndarray:
    """Clip to L2 norm ``clipping_norm`` and add N(0, (noise_multiplier * clipping_norm)^2) noise."""
    flat = np.asarray(update, dtype=np.float64)
    norm = float(np.linalg.norm(flat))
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    noisy = flat * scale + rng.normal(0.0, noise_multiplier * clipping_norm, size=flat.shape)
    return noisy.astype(np.asarray(update).dtype)


def _jsonable(config: Mapping[str, object]) -> dict[str, object]:
    return {
        str(k): (v if isinstance(v, bool | int | float | str) or v is None else repr(v))
        for k, v in config.items()
    }


def open_guard(
    site_dir: Path,
    *,
    run_id: int,
    task: str,
    config: Mapping[str, object],
    app_hash: str | None = None,
    study: StudyConfig | None = None,
) -> SiteGuard:
    """Audit the instruction, then refuse it (``SiteRefusal``) or return the guard for its reply.

    Checks, in order: the site's policy.toml is readable (an unreadable policy refuses
    everything), the running code is on the app allow-list, the task is accepted, the
    instruction asks for nothing outside the study protocol, and the ``study`` the site
    parsed (when given) is inside the policy's ``[bounds]``. An audit log that cannot be
    written (or no longer verifies against its anchor) raises ``SarcofedError`` with a reason
    that names no file: nothing is answered unaudited. An empty allow-list is logged
    as a warning on the first message of each run (the audit log says which run is new).
    """
    site_dir = Path(site_dir)
    audit = AuditLog.for_site(site_dir)
    app_hash = app_hash or current_app_hash()
    try:
        first_of_run = not audit.has_run(run_id)
        audit.append(
            "received", run_id=run_id, task=task, app_hash=app_hash, payload={"config": _jsonable(config)}
        )
    except (OSError, AuditLogError) as err:  # the reason leaves; which file and why stay here
        log.error("site %s: cannot write its audit log %s: %s", site_dir, audit.path, err)
        raise SarcofedError(
            f"{AUDIT_UNAVAILABLE} (its log says why; `sarcofed site audit SITE --verify` checks the log)"
        ) from err
    try:
        policy = load_policy(site_dir)
    except SiteFolderError as err:
        guard = SiteGuard(site_dir, SitePolicy(), audit, app_hash, run_id, task)
        raise guard._refuse(
            f"the site's release policy is invalid, so nothing is released: {redact(str(err), site_dir)}"
        ) from err
    guard = SiteGuard(site_dir, policy, audit, app_hash, run_id, task)
    reason = app_refusal(app_hash, policy.allowed_apps)
    if reason:
        raise guard._refuse(reason)
    if not policy.allowed_apps and first_of_run:  # once per site per study, not on every message
        log.warning(
            "site %s: allowed-apps is empty, so any sarcofed code may run (hash %s)", site_dir, app_hash
        )
    if task not in ALWAYS_ACCEPTED and not policy.accepts(task):
        raise guard._refuse(
            f"this site does not accept '{task}' tasks (accept-tasks in policy.toml: "
            f"{', '.join(policy.accept_tasks) or 'none'})"
        )
    reason = config_refusal(config) or (bounds_refusal(policy, study) if study is not None else None)
    if reason:
        raise guard._refuse(reason)
    return guard
