"""Score a site: a model against the site's labels (``evaluate``) or two label sets (``compare``).

Per-slice values (:class:`SliceRecord`) stay in memory at the site. Only the aggregate
:class:`~protocols.payloads.EvaluationPayload` built by :func:`aggregate` may leave it.

Pooling conventions (every pooled number names its pooling):

- ``ClassScores.iou`` / ``.dice`` are distributions of per-slice values over the slices where
  the class is defined; ``intersection_px`` / ``union_px`` are pooled over pixels.
- ``AreaAgreement`` and ``SmiAgreement`` are over slices; differences are test - label.
- ``SarcopeniaConfusion`` counts slices (a patient with several slices counts several times;
  ``n_groups`` says how many patients there are).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import numpy as np

from common.cutoffs import get_cutoff_set, is_sarcopenic
from common.dataset import LoadedSlice, SiteDataset, dataset_fingerprint, iter_slices
from common.errors import SliceError
from common.metrics import (
    ClassOverlap,
    bin_counts,
    confusion_matrix,
    overlap_counts,
    overlap_from_confusion,
    pixel_area_cm2,
    smi,
    summarise,
    total_overlap,
)
from protocols.classes import METRIC_CLASSES, TISSUES, ExclusionReason
from protocols.payloads import (
    AreaAgreement,
    ClassScores,
    EvaluationPayload,
    Role,
    SarcopeniaConfusion,
    SmiAgreement,
)
from protocols.protocol import HuRanges, LabelProtocol

if TYPE_CHECKING:  # torch is imported only when a model is run, never for scoring or pooling
    from common.device import Compute
    from common.model import LoadedModel

log = logging.getLogger(__name__)

#: Called once per scored slice with the loaded slice (HU, spacing, label) and the test mask,
#: so a discrepancy analysis can run without reading the data twice.
SliceHook = Callable[[LoadedSlice, np.ndarray], None]
_T = TypeVar("_T")


@dataclass(frozen=True)
class SliceRecord:
    """Everything scored on one slice. Kept in memory at the site only; never sent.

    ``overlap``, ``iou`` and ``dice`` are keyed by METRIC_CLASSES (None where the class is
    empty in both masks); areas and mean HU are keyed by TISSUES (mean HU None where the
    tissue is absent). ``harmonised`` holds the overlap after :func:`harmonise` of both masks.
    """

    #: the patient key (:func:`common.dataset.row_group`)
    group: str
    overlap: dict[str, ClassOverlap]
    iou: dict[str, float | None]
    dice: dict[str, float | None]
    label_cm2: dict[str, float]
    test_cm2: dict[str, float]
    label_hu: dict[str, float | None]
    test_hu: dict[str, float | None]
    height_m: float | None
    sex: str | None
    smi_label: float | None
    smi_test: float | None
    harmonised: dict[str, ClassOverlap] | None = None
    #: evaluate: overlap of the prediction before the protocol's HU ranges were applied.
    raw: dict[str, ClassOverlap] | None = None


def harmonise(mask: np.ndarray, hu: np.ndarray, hu_ranges: HuRanges) -> np.ndarray:
    """Keep a tissue pixel only when its HU lies in that tissue's range (inclusive); else 0.

    This is the "harmonised rescoring" of body-composition tools: it removes contour and
    density conventions (e.g. intramuscular fat left inside muscle) before comparing masks.
    """
    if mask.shape != hu.shape:
        raise ValueError(f"mask shape {mask.shape} differs from HU image shape {hu.shape}")
    ranges = [hu_ranges.muscle, hu_ranges.subcutaneous_fat, hu_ranges.visceral_fat]
    lower = np.array([-np.inf] + [r[0] for r in ranges], dtype=np.float32)
    upper = np.array([np.inf] + [r[1] for r in ranges], dtype=np.float32)
    index = mask.astype(np.intp, copy=False)
    if mask.size and (int(index.min()) < 0 or int(index.max()) > 3):
        raise ValueError(f"mask holds values outside 0..3: {sorted(np.unique(mask).tolist())}")
    keep = (hu >= lower[index]) & (hu <= upper[index])
    return np.where(keep, mask, 0).astype(mask.dtype, copy=False)


def score_slice(
    test_mask: np.ndarray,
    label_mask: np.ndarray,
    hu: np.ndarray,
    spacing_mm: tuple[float, float],
    *,
    group: str,
    height_m: float | None,
    sex: str | None,
    hu_ranges: HuRanges | None = None,
) -> SliceRecord:
    """Score one slice (test versus label, canonical masks); harmonised too when ``hu_ranges`` is given."""
    counts = confusion_matrix(test_mask, label_mask)
    hu_sums = confusion_matrix(test_mask, label_mask, weights=hu)
    overlap = overlap_from_confusion(counts).classes
    px = pixel_area_cm2(spacing_mm)
    label_cm2: dict[str, float] = {}
    test_cm2: dict[str, float] = {}
    label_hu: dict[str, float | None] = {}
    test_hu: dict[str, float | None] = {}
    for value, name in enumerate(TISSUES, start=1):
        n_label, n_test = int(counts[:, value].sum()), int(counts[value, :].sum())
        label_cm2[name] = n_label * px
        test_cm2[name] = n_test * px
        label_hu[name] = float(hu_sums[:, value].sum() / n_label) if n_label else None
        test_hu[name] = float(hu_sums[value, :].sum() / n_test) if n_test else None
    smi_label = smi_test = None
    if height_m is not None:
        smi_label = smi(label_cm2["muscle"], height_m)
        smi_test = smi(test_cm2["muscle"], height_m)
    harmonised = None
    if hu_ranges is not None:
        harmonised = overlap_counts(
            harmonise(test_mask, hu, hu_ranges), harmonise(label_mask, hu, hu_ranges)
        ).classes
    return SliceRecord(
        group=group,
        overlap=overlap,
        iou={name: overlap[name].iou for name in METRIC_CLASSES},
        dice={name: overlap[name].dice for name in METRIC_CLASSES},
        label_cm2=label_cm2,
        test_cm2=test_cm2,
        label_hu=label_hu,
        test_hu=test_hu,
        height_m=height_m,
        sex=sex,
        smi_label=smi_label,
        smi_test=smi_test,
        harmonised=harmonised,
    )


# --------------------------------------------------------------------------- aggregation


def class_scores(overlaps: Sequence[ClassOverlap]) -> ClassScores:
    """The seed's table column for one class: bins (exact I/U), undefined, IoU/Dice, pooled pixels."""
    bins, undefined = bin_counts(o.iou_exact for o in overlaps)
    total = total_overlap(overlaps)
    return ClassScores(
        bins=bins,
        undefined=undefined,
        iou=summarise(o.iou for o in overlaps if o.iou is not None),
        dice=summarise(o.dice for o in overlaps if o.dice is not None),
        intersection_px=total.intersection,
        union_px=total.union,
    )


@dataclass(frozen=True)
class _Paired:
    """Label/test means and difference moments over n paired values."""

    n: int
    mean_label: float | None = None
    mean_test: float | None = None
    mean_diff: float | None = None
    sd_diff: float | None = None
    sum_diff: float = 0.0
    sum_sq_diff: float = 0.0


def _paired(label: Sequence[float], test: Sequence[float]) -> _Paired:
    if not label:
        return _Paired(n=0)
    a, b = np.asarray(label, dtype=np.float64), np.asarray(test, dtype=np.float64)
    diff = b - a
    return _Paired(
        n=len(a),
        mean_label=float(a.mean()),
        mean_test=float(b.mean()),
        mean_diff=float(diff.mean()),
        sd_diff=float(diff.std(ddof=1)) if len(a) >= 2 else None,
        sum_diff=float(diff.sum()),
        sum_sq_diff=float(np.square(diff).sum()),
    )


def _mean_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def area_agreement(records: Sequence[SliceRecord], tissue: str) -> AreaAgreement:
    """Area agreement of one tissue over all records.

    ``mean_hu_label`` / ``mean_hu_test`` are means over slices of the per-slice mean HU, over
    the slices where that mask has the tissue.
    """
    p = _paired([r.label_cm2[tissue] for r in records], [r.test_cm2[tissue] for r in records])
    return AreaAgreement(
        n=p.n,
        mean_label_cm2=p.mean_label,
        mean_test_cm2=p.mean_test,
        mean_diff_cm2=p.mean_diff,
        sd_diff_cm2=p.sd_diff,
        sum_diff_cm2=p.sum_diff,
        sum_sq_diff_cm2=p.sum_sq_diff,
        mean_hu_label=_mean_or_none(r.label_hu[tissue] for r in records),
        mean_hu_test=_mean_or_none(r.test_hu[tissue] for r in records),
    )


def smi_agreement(records: Sequence[SliceRecord]) -> SmiAgreement:
    """SMI agreement (cm^2/m^2, test - label) over the records with a known height."""
    known = [r for r in records if r.smi_label is not None and r.smi_test is not None]
    p = _paired([r.smi_label for r in known], [r.smi_test for r in known])  # type: ignore[misc]
    return SmiAgreement(
        n=p.n,
        mean_label=p.mean_label,
        mean_test=p.mean_test,
        mean_diff=p.mean_diff,
        sd_diff=p.sd_diff,
        sum_diff=p.sum_diff,
        sum_sq_diff=p.sum_sq_diff,
    )


def sarcopenia_confusion(records: Sequence[SliceRecord], cutoff_set: str) -> SarcopeniaConfusion:
    """Sarcopenia calls per slice, label = truth; unknown when height, sex (or BMI) is missing."""
    name = get_cutoff_set(cutoff_set).name.value
    tally: Counter[str] = Counter()
    for r in records:
        truth = is_sarcopenic(r.smi_label, r.sex, name)
        test = is_sarcopenic(r.smi_test, r.sex, name)
        if truth is None or test is None:
            tally["unknown"] += 1
        elif truth and test:
            tally["both_sarcopenic"] += 1
        elif truth:
            tally["label_only"] += 1
        elif test:
            tally["test_only"] += 1
        else:
            tally["neither"] += 1
    return SarcopeniaConfusion(
        cutoff_set=name,
        both_sarcopenic=tally["both_sarcopenic"],
        label_only=tally["label_only"],
        test_only=tally["test_only"],
        neither=tally["neither"],
        unknown=tally["unknown"],
    )


def patients_of(records: Sequence[SliceRecord]) -> frozenset[str]:
    """The patient keys of the records (:func:`common.dataset.row_group`: every slice has one)."""
    return frozenset(r.group for r in records)


def count_groups(records: Sequence[SliceRecord]) -> int:
    """Distinct patients among the records."""
    return len(patients_of(records))


@dataclass(frozen=True)
class Scope:
    """Which slices of a site were scored, and why: the role of the site for this model.

    ``internal``: the site trained the model, so only its held-out test patients are scored
    (``rows`` = the test part of :func:`common.splits.split_site`); ``external``: every usable
    slice (``rows`` None). ``None`` role: a comparison of label sets, no model involved.
    """

    role: Role | None = None
    rows: tuple[int, ...] | None = None

    @property
    def split(self) -> Literal["test", "all"]:
        return "all" if self.rows is None else "test"


EXTERNAL = Scope(role="external")


def aggregate(
    records: Sequence[SliceRecord],
    *,
    task: Literal["evaluate", "compare"],
    site: str,
    fingerprint: str,
    model_hash: str | None,
    n_listed: int,
    excluded: Counter[str] | dict[str, int],
    cutoff_set: str = "prado2008",
    protocol: LabelProtocol | None = None,
    harmonised: bool = False,
    scope: Scope = Scope(),
) -> EvaluationPayload:
    """The site's payload from its slice records (aggregates only; no per-slice value).

    With ``harmonised=True`` every record must carry harmonised overlap counts (score the
    slices with ``hu_ranges``), and ``harmonised_scores`` is filled. ``raw_scores`` are filled
    when the records carry the raw prediction's overlap (``evaluate``).
    """
    protocol = protocol or LabelProtocol()
    get_cutoff_set(cutoff_set)  # an unknown name fails even when there is no record
    harmonised_scores = None
    if harmonised:
        missing = sum(r.harmonised is None for r in records)
        if missing:
            raise ValueError(
                f"harmonised scores asked but {missing} of {len(records)} slice records were scored "
                "without hu_ranges; pass hu_ranges to score_slice"
            )
        harmonised_scores = {
            name: class_scores([r.harmonised[name] for r in records])  # type: ignore[index]
            for name in METRIC_CLASSES
        }
    raw_scores = None
    if records and all(r.raw is not None for r in records):
        raw_scores = {
            name: class_scores([r.raw[name] for r in records])  # type: ignore[index]
            for name in METRIC_CLASSES
        }
    return EvaluationPayload(
        task=task,
        site=site,
        dataset_fingerprint=fingerprint,
        model_hash=model_hash,
        n_listed=n_listed,
        n_used=len(records),
        n_groups=count_groups(records),
        excluded={reason: int(n) for reason, n in sorted(excluded.items()) if n},
        scores={name: class_scores([r.overlap[name] for r in records]) for name in METRIC_CLASSES},
        areas={tissue: area_agreement(records, tissue) for tissue in TISSUES},
        smi=smi_agreement(records),
        sarcopenia=sarcopenia_confusion(records, cutoff_set),
        role=scope.role,
        split=scope.split,
        n_in_split=None if scope.rows is None else len(scope.rows),
        protocol=protocol,
        raw_scores=raw_scores,
        harmonised_scores=harmonised_scores,
    )


# --------------------------------------------------------------------------- site runs


class _SiteRun:
    """Accumulates records and exclusion counts while a site is scored (one batch in memory)."""

    def __init__(
        self, hu_ranges: HuRanges | None, on_slice: SliceHook | None, apply: HuRanges | None = None
    ) -> None:
        self.hu_ranges = hu_ranges
        self.apply = apply
        self.on_slice = on_slice
        self.records: list[SliceRecord] = []
        self.excluded: Counter[str] = Counter()

    def exclude(self, reason: ExclusionReason) -> None:
        self.excluded[reason.value] += 1

    def score(self, item: LoadedSlice, test_mask: np.ndarray) -> None:
        """Score one slice; a failure is counted as ``evaluation_error`` and the site goes on.

        With ``apply`` (a prediction), the test mask is cut to those HU ranges first and the
        raw mask is scored too (``raw`` counts). Exceptions raised by ``on_slice`` propagate:
        the hook's owner decides how to isolate them.
        """
        raw_mask = None
        try:
            if self.apply is not None:
                raw_mask, test_mask = test_mask, harmonise(test_mask, item.ct.hu, self.apply)
            record = score_slice(
                test_mask,
                item.label,
                item.ct.hu,
                item.ct.spacing_mm,
                group=item.group,
                height_m=item.height_m,
                sex=item.sex,
                hu_ranges=self.hu_ranges,
            )
            if raw_mask is not None:
                record = replace(record, raw=overlap_counts(raw_mask, item.label).classes)
        except Exception as exc:  # one bad slice must never stop the site
            log.warning("manifest row %s: scoring failed (%s); counted as evaluation_error", item.index, exc)
            self.exclude(ExclusionReason.evaluation_error)
            return
        self.records.append(record)
        if self.on_slice is not None:
            self.on_slice(item, test_mask)


def _with_progress(items: Iterable[_T], total: int, enabled: bool, desc: str) -> Iterator[_T]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, unit="slice")


def evaluate_site(
    site: SiteDataset,
    model: Path | str | LoadedModel,
    *,
    cutoff_set: str = "prado2008",
    batch_size: int = 4,
    progress: bool = False,
    harmonised: bool = True,
    protocol: LabelProtocol | None = None,
    scope: Scope = EXTERNAL,
    on_slice: SliceHook | None = None,
    compute: Compute | None = None,
) -> tuple[EvaluationPayload, list[SliceRecord]]:
    """Run the model on a site's usable slices and score it against the site's labels.

    ``site`` is the parsed site folder (``common.dataset.load_site``, once, by the caller).
    ``model`` is a ``model.pt`` path (read with ``common.model.load_model``) or a LoadedModel
    already in memory (its ``weights_hash`` becomes the payload's ``model_hash``). ``scope``
    says which rows are scored (an internal site: its test patients only).

    Each prediction is cut to the ``protocol``'s HU ranges before it is scored and handed to
    ``on_slice`` (what a body-composition tool reports); the raw prediction is scored too
    (``raw_scores``). Streams: reads ``batch_size`` slices, predicts, scores, drops the
    images. Unusable rows are counted by their ExclusionReason; a batch whose prediction
    fails is retried slice by slice, and a slice that still fails (or fails scoring) counts
    as ``evaluation_error``. ``on_slice(loaded_slice, protocol_applied_mask)`` is called for
    every scored slice. ``compute`` (``common.device``): where and in what precision the model
    runs, which the payload's ``compute`` says (``None``: the model as it is, in fp32; the
    payload does not say).
    """
    from common.inference import Segmenter  # torch: imported only when a model is run
    from common.model import load_model

    get_cutoff_set(cutoff_set)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    protocol = protocol or LabelProtocol()
    hu_ranges = protocol.hu_ranges
    loaded = load_model(model) if isinstance(model, Path | str) else model
    total = site.n_listed if scope.rows is None else len(scope.rows)
    segment = Segmenter.build(loaded.model, loaded.spec, compute, slices=total)
    run = _SiteRun(hu_ranges if harmonised else None, on_slice, apply=hu_ranges)

    def predict(batch: list[LoadedSlice]) -> None:
        try:
            masks = segment([s.ct.hu for s in batch], batch_size=batch_size)
        except Exception as exc:
            if len(batch) == 1:
                log.warning("manifest row %s: prediction failed (%s)", batch[0].index, exc)
                run.exclude(ExclusionReason.evaluation_error)
                return
            log.warning("prediction failed on a batch of %d (%s); retrying slice by slice", len(batch), exc)
            for one in batch:
                predict([one])
            return
        for item, mask in zip(batch, masks, strict=True):
            run.score(item, mask)

    batch: list[LoadedSlice] = []
    for item in _with_progress(iter_slices(site, rows=scope.rows), total, progress, "evaluate"):
        if isinstance(item, SliceError):
            run.exclude(item.reason)
            continue
        batch.append(item)
        if len(batch) >= batch_size:
            predict(batch)
            batch = []
    if batch:
        predict(batch)
    payload = aggregate(
        run.records,
        task="evaluate",
        site=site.config.name,
        fingerprint=dataset_fingerprint(site),
        model_hash=loaded.weights_hash,
        n_listed=site.n_listed,
        excluded=run.excluded,
        cutoff_set=cutoff_set,
        protocol=protocol,
        harmonised=harmonised,
        scope=scope,
    )
    used = segment.compute.used if compute is not None else None
    return payload.model_copy(update={"compute": used}), run.records


def compare_site(
    site: SiteDataset,
    *,
    cutoff_set: str = "prado2008",
    progress: bool = False,
    harmonised: bool = True,
    protocol: LabelProtocol | None = None,
    on_slice: SliceHook | None = None,
) -> tuple[EvaluationPayload, list[SliceRecord]]:
    """Score the site's ``reference`` masks (test) against its ``label`` masks (truth), no model.

    ``site`` is the parsed site folder (``common.dataset.load_site``). Rows without a
    reference count as excluded ``no_reference``. ``on_slice(loaded_slice, reference_mask)``
    is called for every scored slice. The reference masks are scored as drawn (another
    reader's convention is the point of a comparison).
    """
    get_cutoff_set(cutoff_set)
    protocol = protocol or LabelProtocol()
    run = _SiteRun(protocol.hu_ranges if harmonised else None, on_slice)
    for item in _with_progress(iter_slices(site, with_reference=True), site.n_listed, progress, "compare"):
        if isinstance(item, SliceError):
            run.exclude(item.reason)
        elif item.reference is None:
            run.exclude(ExclusionReason.no_reference)
        else:
            run.score(item, item.reference)
    payload = aggregate(
        run.records,
        task="compare",
        site=site.config.name,
        fingerprint=dataset_fingerprint(site),
        model_hash=None,
        n_listed=site.n_listed,
        excluded=run.excluded,
        cutoff_set=cutoff_set,
        protocol=protocol,
        harmonised=harmonised,
    )
    return payload, run.records
