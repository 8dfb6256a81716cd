"""A site's whole evaluation: seed metrics, label audit and label-definition findings, in one pass.

``common.evaluation`` scores slices; ``common.label_audit`` checks the site's labels against
the study's label protocol from the image alone; ``common.discrepancy`` explains where the
labels and the (protocol-applied) prediction disagree; ``common.attribution`` says whose
difference each finding is. This module runs them over the site's data once (fed from the
evaluation's per-slice hook) and returns the aggregate payload a site would send. The
caller parses the site folder once (``common.dataset.load_site``) and passes the
``SiteDataset``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.attribution import attribute_all
from common.dataset import LoadedSlice, SiteDataset
from common.device import Compute
from common.discrepancy import DiscrepancyAccumulator, analyse_slice
from common.discrepancy.impact import ImpactAccumulator
from common.evaluation import EXTERNAL, Scope, SliceRecord, compare_site, evaluate_site, patients_of
from common.label_audit import LabelAuditAccumulator, audit_slice
from common.metrics import pixel_area_cm2
from common.model import LoadedModel, ModelSpec, weights_hash
from protocols.findings import ErrorProfile
from protocols.payloads import EvaluationPayload
from protocols.protocol import LabelProtocol

#: Below this many slices a site's discrepancy maps are withheld (the site policy may ask more).
DEFAULT_MIN_SLICES = 5


@dataclass(frozen=True)
class Scored:
    """A site's evaluation: the aggregate payload, and (kept at the site) the per-slice records.

    The records never leave the site: its release policy needs them, for the patients a reply
    summarises (the release ledger refuses one that differs from an earlier one by a single
    patient) and to release the aggregates with differential privacy when the policy asks.
    """

    payload: EvaluationPayload
    records: tuple[SliceRecord, ...]

    @property
    def patients(self) -> frozenset[str]:
        return patients_of(self.records)


class _Analyses:
    """The per-slice hook: label audit always, discrepancy analysis when asked."""

    def __init__(self, cutoff_set: str, protocol: LabelProtocol, discrepancy: bool) -> None:
        self.protocol = protocol
        self.audit = LabelAuditAccumulator(protocol)
        self.acc = DiscrepancyAccumulator(hu_ranges=protocol.hu_ranges) if discrepancy else None
        self.impact = ImpactAccumulator(cutoff_set)

    def __call__(self, item: LoadedSlice, test_mask: np.ndarray) -> None:
        spacing = item.ct.spacing_mm
        result = None
        if self.acc is not None:
            # The site's labels are compared with the reference (model prediction or reference mask).
            result = analyse_slice(
                item.ct.hu, spacing, item.label, test_mask, hu_ranges=self.protocol.hu_ranges
            )
            self.acc.add(result)
            muscle_cm2 = float((item.label == 1).sum()) * pixel_area_cm2(spacing)
            self.impact.add(result, site_muscle_cm2=muscle_cm2, height_m=item.height_m, sex=item.sex)
        frame = result.frame if result is not None else None
        self.audit.add(audit_slice(item.ct.hu, spacing, item.label, self.protocol, frame=frame))

    def attach(
        self, payload: EvaluationPayload, min_slices: int, *, profile: ErrorProfile | None, attribute: bool
    ) -> EvaluationPayload:
        audit = self.audit.finalise(min_slices=min_slices)
        update: dict[str, object] = {"label_audit": audit}
        if self.acc is not None:
            summary = self.acc.finalise(min_slices=min_slices)
            findings = [self.impact.annotate(f) for f in summary.findings]
            if attribute:
                findings = attribute_all(findings, audit=audit, profile=profile, protocol=self.protocol)
            update |= {"discrepancy": summary.model_copy(update={"findings": findings}), "findings": findings}
        return payload.model_copy(update=update)


def evaluate_with_model(
    site: SiteDataset,
    model: torch.nn.Module | LoadedModel | Path | str,
    spec: ModelSpec | None = None,
    *,
    model_hash: str | None = None,
    cutoff_set: str = "prado2008",
    batch_size: int = 4,
    discrepancy: bool = True,
    harmonised: bool = True,
    progress: bool = False,
    min_slices: int = DEFAULT_MIN_SLICES,
    protocol: LabelProtocol | None = None,
    scope: Scope = EXTERNAL,
    profile: ErrorProfile | None = None,
    compute: Compute | None = None,
) -> Scored:
    """Score a model on a parsed site; ``model`` is a model.pt path, a LoadedModel or a module + spec.

    ``compute`` (``common.device``): where and in what precision the model runs (``None``: fp32
    on the device the model is on); the payload's ``compute`` says which.

    Findings carry an attribution from this site's own evidence: its label audit, and the
    model's error ``profile`` when one is known (the coordinator re-attributes with the
    study's pooled profile).
    """
    protocol = protocol or LabelProtocol()
    if isinstance(model, torch.nn.Module):
        if spec is None:
            raise ValueError("an in-memory model needs its ModelSpec")
        model.eval()
        state = model.state_dict()
        model = LoadedModel(model=model, spec=spec, meta={}, weights_hash=model_hash or weights_hash(state))
    hook = _Analyses(cutoff_set, protocol, discrepancy)
    payload, records = evaluate_site(
        site,
        model,
        cutoff_set=cutoff_set,
        batch_size=batch_size,
        progress=progress,
        harmonised=harmonised,
        protocol=protocol,
        scope=scope,
        on_slice=hook,
        compute=compute,
    )
    return Scored(hook.attach(payload, min_slices, profile=profile, attribute=True), tuple(records))


def compare_with_reference(
    site: SiteDataset,
    *,
    cutoff_set: str = "prado2008",
    discrepancy: bool = True,
    harmonised: bool = True,
    progress: bool = False,
    min_slices: int = DEFAULT_MIN_SLICES,
    protocol: LabelProtocol | None = None,
) -> Scored:
    """Score the site's labels against its reference masks (no model), with findings and the audit.

    Findings of a comparison are not attributed: both sides are readers of this site.
    """
    protocol = protocol or LabelProtocol()
    hook = _Analyses(cutoff_set, protocol, discrepancy)
    payload, records = compare_site(
        site,
        cutoff_set=cutoff_set,
        progress=progress,
        harmonised=harmonised,
        protocol=protocol,
        on_slice=hook,
    )
    return Scored(hook.attach(payload, min_slices, profile=None, attribute=False), tuple(records))
