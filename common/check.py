"""``sarcofed site check``: is this site folder usable, and does it look like L3 body composition?

:func:`check_site` reads every manifest row (one bad file never stops it) and returns a
:class:`SiteCheckReport`. The report is for the person at the site: it lists file names
and stays local; nothing here is sent anywhere. Pixel statistics are pooled over pixels of
all usable slices. The tissue table's HU ranges and the label audit both follow the study's
label protocol (default Alberta). Each raw mask value is also described before mapping
(``common.mask_values``, ``common.label_guess``): when site.toml's ``[labels]`` clearly
contradicts what the values look like, the report is not usable and carries the mapping
that fits the data.
Reference masks are read too: a row whose reference cannot be used stays usable (evaluate
and train need no reference) but is listed in ``reference_problems``, because ``compare``
will drop it.
The CLI renders the report (``client.render.render_check``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from common.dataset import (
    MANIFEST_CSV,
    LoadedSlice,
    SiteDataset,
    dataset_fingerprint,
    load_reference,
    load_slice,
)
from common.discrepancy.frame import BodyFrame, body_frame
from common.errors import SliceError
from common.label_audit import LabelAuditAccumulator, audit_slice
from common.label_conventions import confirms
from common.label_guess import MappingVerdict, mapping_verdict, propose_mapping
from common.mask_values import LabelValueAccumulator, ValueStats
from protocols.classes import TISSUES, ExclusionReason
from protocols.findings import LabelAudit
from protocols.protocol import HuRanges, LabelProtocol

log = logging.getLogger(__name__)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SliceProblem(_Model):
    """One excluded row: local only (it names a file)."""

    file: str = Field(description="path relative to the site folder")
    line: int | None = Field(default=None, description="line in manifest.csv")
    reason: str
    detail: str


class SpacingRange(_Model):
    min_mm: float
    max_mm: float


class ClassCheck(_Model):
    """Statistics of one canonical tissue over all usable slices, pooled over pixels."""

    label_values: list[int] = Field(description="raw site values seen that map to this class")
    pixels: int = 0
    hu_range: tuple[float, float]
    share_in_hu_range: float | None = Field(default=None, description="share of its pixels inside hu_range")
    mean_hu: float | None = None


class SiteCheckReport(_Model):
    """What ``sarcofed site check`` found in a site folder."""

    site: str
    fingerprint: str
    n_listed: int = Field(description="data rows in manifest.csv")
    n_usable: int
    excluded: dict[str, int] = Field(default_factory=dict, description="ExclusionReason -> count")
    problems: list[SliceProblem] = Field(default_factory=list)
    reference_problems: list[SliceProblem] = Field(
        default_factory=list,
        description="usable rows whose reference mask compare cannot use (the row itself is usable)",
    )
    background_values: list[int] = Field(default_factory=list, description="raw values seen mapping to 0")
    classes: dict[str, ClassCheck] = Field(default_factory=dict, description="keys = TISSUES")
    pixel_spacing: SpacingRange | None = None
    image_sizes: list[str] = Field(default_factory=list, description="distinct rows x columns")
    n_groups: int = 0
    n_heights_known: int = 0
    n_sex_known: int = 0
    label_audit: LabelAudit | None = Field(
        default=None,
        description="the site's labels checked against the label protocol from the images, no model",
    )
    mask_values: list[ValueStats] = Field(
        default_factory=list, description="every raw mask value (before mapping), pooled over usable slices"
    )
    mapping: MappingVerdict | None = Field(
        default=None,
        description="site.toml [labels] against what the data look like, with the mapping that fits",
    )
    declared_conventions: dict[str, bool] = Field(
        default_factory=dict,
        description="site.toml label_conventions -> whether this label audit confirms it "
        "(convention-aware training applies only confirmed ones, auditing its training slices)",
    )

    @property
    def mapping_fits(self) -> bool:
        """False when [labels] clearly does not fit the data (``mapping`` says what would)."""
        return self.mapping is None or self.mapping.fits

    @property
    def usable(self) -> bool:
        """At least one usable slice, and a [labels] mapping that does not clearly contradict the data."""
        return self.n_usable > 0 and self.mapping_fits


#: Longest file name or detail the report shows in full; longer ones keep their two ends.
SHOWN_CHARS = 300


def display_text(text: str) -> str:
    """``text`` safe to print on a terminal: control characters (a NUL, an escape code, a
    newline in a file name or a DICOM value) written as ``\\x1b``, and a text longer than
    :data:`SHOWN_CHARS` cut in the middle, saying how long it was."""
    safe = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    if len(safe) <= SHOWN_CHARS:
        return safe
    return f"{safe[:200]}...({len(safe):,} characters)...{safe[-60:]}"


def _problem(path: Path | str, root: Path, line: int | None, reason: str, detail: str) -> SliceProblem:
    return SliceProblem(
        file=display_text(_relative(Path(path), root)), line=line, reason=reason, detail=display_text(detail)
    )


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to the site folder; as written when outside it (``/etc/x``, not ``../../etc/x``)."""
    if not path.is_absolute():
        return str(path)  # already as written in manifest.csv
    try:
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    except ValueError:
        return str(path)
    return str(path) if relative.split(os.sep)[0] == os.pardir else relative


class _Accumulator:
    """Running pixel sums per class; a pure fold over loaded slices."""

    def __init__(self, hu_ranges: HuRanges) -> None:
        self.hu_ranges = hu_ranges
        self.pixels = dict.fromkeys(TISSUES, 0)
        self.in_range = dict.fromkeys(TISSUES, 0)
        self.hu_sum = dict.fromkeys(TISSUES, 0.0)
        self.values: dict[int, set[int]] = {c: set() for c in range(4)}
        self.spacings: list[float] = []
        self.sizes: set[str] = set()
        self.groups: set[str] = set()
        self.heights = 0
        self.sexes = 0

    def add(self, item: LoadedSlice, lookup: dict[int, int]) -> None:
        hu = item.ct.hu
        for canonical, name in enumerate(TISSUES, start=1):
            values = hu[item.label == canonical]
            low, high = getattr(self.hu_ranges, name)
            self.pixels[name] += int(values.size)
            self.in_range[name] += int(np.count_nonzero((values >= low) & (values <= high)))
            self.hu_sum[name] += float(values.sum(dtype=np.float64))
        for value in item.label_values:
            self.values[lookup[value]].add(value)
        self.spacings.extend(item.ct.spacing_mm)
        self.sizes.add(f"{item.ct.shape[0]}x{item.ct.shape[1]}")
        self.groups.add(item.group)
        self.heights += item.height_m is not None
        self.sexes += item.sex is not None

    def classes(self) -> dict[str, ClassCheck]:
        out = {}
        for canonical, name in enumerate(TISSUES, start=1):
            n = self.pixels[name]
            out[name] = ClassCheck(
                label_values=sorted(self.values[canonical]),
                pixels=n,
                hu_range=getattr(self.hu_ranges, name),
                share_in_hu_range=self.in_range[name] / n if n else None,
                mean_hu=self.hu_sum[name] / n if n else None,
            )
        return out


def _frame(item: LoadedSlice) -> BodyFrame | None:
    """The slice's body frame, built once for the label audit and the mask-value statistics."""
    try:
        return body_frame(item.ct.hu, item.ct.spacing_mm)
    except ValueError as exc:
        log.info("no body frame for %s (%s)", item.row.image, exc)
    except Exception:  # the frame only explains labels; it never stops the check
        log.exception("body frame failed for %s", item.row.image)
    return None


def check_site(
    site: SiteDataset,
    *,
    on_row: Callable[[int, int], None] | None = None,
    protocol: LabelProtocol | None = None,
) -> SiteCheckReport:
    """Check every row of a parsed site folder. ``on_row(done, total)`` reports progress.

    The caller parses the folder (``common.dataset.load_site``, which raises
    ``SiteFolderError`` when the folder itself is unusable); a bad row never stops the check.
    Every usable slice also goes through the model-free label audit against ``protocol``
    (default Alberta): the site sees its own label conventions before any study. The tissue
    table's HU ranges are that protocol's too.
    """
    root = site.root
    lookup = site.config.labels.lookup()
    total = site.n_listed
    protocol = protocol or LabelProtocol()
    acc = _Accumulator(protocol.hu_ranges)
    audit = LabelAuditAccumulator(protocol)
    values = LabelValueAccumulator(protocol)
    problems: list[SliceProblem] = []
    reference_problems: list[SliceProblem] = []
    n_usable = 0
    for index in range(len(site)):
        line = site.lines[index] if index < len(site.lines) else None
        try:
            item = load_slice(site, index)
        except SliceError as exc:
            problems.append(_problem(exc.path, root, line, exc.reason.value, exc.detail))
        except Exception as exc:  # a bug of ours: one bad file still never stops the check
            log.debug("unexpected failure on manifest row %d", index, exc_info=True)
            problems.append(
                _problem(
                    site.rows[index].image,
                    root,
                    line,
                    ExclusionReason.evaluation_error.value,
                    f"unexpected {type(exc).__name__}: {exc}",
                )
            )
        else:
            n_usable += 1
            acc.add(item, lookup)
            frame = _frame(item)
            try:
                load_reference(site, item)
            except SliceError as exc:
                reference_problems.append(_problem(exc.path, root, line, exc.reason.value, exc.detail))
            try:
                audit.add(
                    audit_slice(item.ct.hu, item.ct.spacing_mm, item.label, audit.protocol, frame=frame)
                )
            except Exception:  # the audit explains labels; it never makes a slice unusable
                log.exception("label audit failed on manifest row %d", index)
            try:
                if item.raw_label is not None:
                    values.add(item.ct.hu, item.ct.spacing_mm, item.raw_label, frame=frame)
            except Exception:  # nor does the mapping guess
                log.exception("label value statistics failed on manifest row %d", index)
        if on_row is not None:
            on_row(index + 1, total)
    for invalid in site.invalid_rows:
        error = invalid.error(root)
        problems.append(_problem(MANIFEST_CSV, root, invalid.line, error.reason.value, invalid.detail))
    if on_row is not None:
        on_row(total, total)
    spacing = SpacingRange(min_mm=min(acc.spacings), max_mm=max(acc.spacings)) if acc.spacings else None
    value_stats = values.finalise()
    verdict = (
        mapping_verdict(site.config.labels, propose_mapping(value_stats, protocol)) if value_stats else None
    )
    label_audit = audit.finalise(min_slices=1)
    return SiteCheckReport(
        site=site.name,
        declared_conventions={name: confirms(label_audit, name) for name in site.config.label_conventions},
        fingerprint=dataset_fingerprint(site),
        n_listed=total,
        n_usable=n_usable,
        excluded=dict(sorted(Counter(p.reason for p in problems).items())),
        problems=problems,
        reference_problems=reference_problems,
        background_values=sorted(acc.values[0]),
        classes=acc.classes(),
        pixel_spacing=spacing,
        image_sizes=sorted(acc.sizes),
        label_audit=label_audit,
        n_groups=len(acc.groups),
        n_heights_known=acc.heights,
        n_sex_known=acc.sexes,
        mask_values=list(value_stats),
        mapping=verdict,
    )


__all__ = [
    "SHOWN_CHARS",
    "ClassCheck",
    "SiteCheckReport",
    "SliceProblem",
    "SpacingRange",
    "check_site",
    "display_text",
]
