"""A site's whole evaluation: seed metrics plus label-definition discrepancy, in one pass.

``common.evaluation`` scores slices; ``common.discrepancy`` explains disagreements. This
module runs both over the site's data once (the discrepancy analysis is fed from the
evaluation's per-slice hook), and returns the aggregate payload a site would send. The
caller parses the site folder once (``common.dataset.load_site``) and passes the
``SiteDataset``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.dataset import LoadedSlice, SiteDataset
from common.discrepancy import DiscrepancyAccumulator, analyse_slice
from common.discrepancy.impact import ImpactAccumulator
from common.evaluation import compare_site, evaluate_site
from common.model import LoadedModel, ModelSpec, weights_hash
from protocols.payloads import EvaluationPayload

#: Below this many slices a site's discrepancy maps are withheld (the site policy may ask more).
DEFAULT_MIN_SLICES = 5


class _Discrepancy:
    def __init__(self, cutoff_set: str) -> None:
        self.acc = DiscrepancyAccumulator()
        self.impact = ImpactAccumulator(cutoff_set)

    def __call__(self, item: LoadedSlice, test_mask: np.ndarray) -> None:
        # The site's labels are compared with the reference (model prediction or reference mask).
        result = analyse_slice(item.ct.hu, item.ct.spacing_mm, item.label, test_mask)
        self.acc.add(result)
        muscle_cm2 = float((item.label == 1).sum()) * item.ct.spacing_mm[0] * item.ct.spacing_mm[1] / 100.0
        self.impact.add(result, site_muscle_cm2=muscle_cm2, height_m=item.height_m, sex=item.sex)

    def attach(self, payload: EvaluationPayload, min_slices: int) -> EvaluationPayload:
        summary = self.acc.finalise(min_slices=min_slices)
        findings = [self.impact.annotate(f) for f in summary.findings]
        summary = summary.model_copy(update={"findings": findings})
        return payload.model_copy(update={"discrepancy": summary, "findings": findings})


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
) -> EvaluationPayload:
    """Score a model on a parsed site; ``model`` is a model.pt path, a LoadedModel or a module + spec."""
    if isinstance(model, torch.nn.Module):
        if spec is None:
            raise ValueError("an in-memory model needs its ModelSpec")
        model.eval()
        state = model.state_dict()
        model = LoadedModel(model=model, spec=spec, meta={}, weights_hash=model_hash or weights_hash(state))
    hook = _Discrepancy(cutoff_set) if discrepancy else None
    payload, _records = evaluate_site(
        site,
        model,
        cutoff_set=cutoff_set,
        batch_size=batch_size,
        progress=progress,
        harmonised=harmonised,
        on_slice=hook,
    )
    return hook.attach(payload, min_slices) if hook else payload


def compare_with_reference(
    site: SiteDataset,
    *,
    cutoff_set: str = "prado2008",
    discrepancy: bool = True,
    harmonised: bool = True,
    progress: bool = False,
    min_slices: int = DEFAULT_MIN_SLICES,
) -> EvaluationPayload:
    """Score the site's labels against its reference masks (no model), with findings."""
    hook = _Discrepancy(cutoff_set) if discrepancy else None
    payload, _records = compare_site(
        site, cutoff_set=cutoff_set, progress=progress, harmonised=harmonised, on_slice=hook
    )
    return hook.attach(payload, min_slices) if hook else payload
