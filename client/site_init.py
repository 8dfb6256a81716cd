"""``sarcofed site init``: a site folder built from a hospital's export, without copying a file.

:func:`init_site` pairs the export's CT slices and masks (``client.export_scan``), reads each
pair once to describe every mask value (``common.mask_values``) and proposes the
``[labels]`` mapping, then writes into ``SITE_DIR``:

- ``site.toml`` with ``data_root`` = the export (manifest paths point into it, read only)
  and the *proposed* ``[labels]``, commented value by value and marked for the site to
  confirm;
- ``manifest.csv``: one row per usable pair; ``group`` is the PatientID hashed (HMAC-SHA256)
  with the site's secret, never the ID itself; ``height_m`` and ``sex`` from the DICOM header
  when present;
- ``.group-secret``: that secret (readable by this account only; kept on re-runs so groups
  stay the same; never sent).

It returns an :class:`InitReport`: the pairs, every file it could not pair or use and why,
the CT series without any mask (with a suggested L3 range and the workbench command), and
the next command. An existing ``site.toml`` or ``manifest.csv`` is replaced only with
``force``. The CLI is ``client.site_init_cli``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shlex
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
from pydantic import BaseModel, ConfigDict, Field

from client.export_scan import ExportScan, Pair, scan_export
from client.patient_groups import SECRET_FILE, new_secret, patient_group, read_secret, write_secret
from common.dataset import MANIFEST_CSV, SITE_TOML
from common.dicom_io import read_ct_slice
from common.errors import SarcofedError, SliceError
from common.l3_suggestion import suggest_l3
from common.label_guess import MappingProposal, propose_mapping
from common.mask_values import MAX_VALUES, LabelValueAccumulator, ValueStats
from common.masks import read_mask
from common.series import SeriesInfo, load_volume
from protocols.protocol import ALBERTA, LabelProtocol

log = logging.getLogger(__name__)

#: A series needs this many slices before an L3 range is suggested (vertebrae are counted).
MIN_SERIES_FOR_L3: Final = 8
MANIFEST_COLUMNS: Final = ("image", "label", "group", "height_m", "sex")


class SiteInitError(SarcofedError):
    """``site init`` cannot start (no such export, outputs exist without --force)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class InitProblem(_Model):
    """A file of the export that is in no manifest row, and why."""

    file: str = Field(description="path relative to the export")
    reason: str = Field(description="the problem, shared by every file that has it")
    detail: str = Field("", description="what is particular to this file")


class UnlabelledSeries(_Model):
    """A whole CT series with no mask: to label in the workbench."""

    series_uid: str
    description: str
    folder: str
    slices: int
    l3_first: int | None = Field(default=None, description="suggested L3 range, slice index (superior first)")
    l3_last: int | None = None
    note: str = ""
    command: str = Field(description="the command that opens it in the workbench")


class InitReport(_Model):
    """What ``sarcofed site init`` found and wrote."""

    source: str
    site_dir: str
    written: list[str] = Field(default_factory=list, description="files written in the site folder")
    n_rows: int = Field(description="manifest rows written (usable pairs)")
    paired_by: dict[str, int] = Field(default_factory=dict, description="how pairs were made -> count")
    unpaired: list[InitProblem] = Field(default_factory=list)
    series: list[UnlabelledSeries] = Field(default_factory=list)
    mask_values: list[ValueStats] = Field(
        default_factory=list, description="every mask value (before mapping), pooled over the usable pairs"
    )
    proposal: MappingProposal
    next_command: str = ""


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:
        return str(path)


def _patient_id(path: Path) -> str:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # read_ct_slice read it already; a missing ID only means no group
        return ""
    return str(ds.get("PatientID", "") or "").strip()


def _series_entry(series: SeriesInfo, source: Path, site_dir: Path) -> UnlabelledSeries:
    folder = Path(os.path.commonpath([str(h.path.parent) for h in series.slices]))
    first = last = None
    note = ""
    if series.count >= MIN_SERIES_FOR_L3:
        try:
            suggestion = suggest_l3(load_volume(series))
            first, last, note = suggestion.start, suggestion.end, suggestion.note
        except Exception as exc:  # a series that cannot be stacked is still listed
            note = f"no L3 suggestion: {exc}"
    else:
        note = f"only {series.count} slices: too few to suggest L3"
    workbench_site = site_dir.with_name(f"{site_dir.name}-workbench")
    return UnlabelledSeries(
        series_uid=series.series_uid,
        description=series.description,
        folder=_relative(folder, source),
        slices=series.count,
        l3_first=first,
        l3_last=last,
        note=note,
        command=shlex.join(["sarcofed", "site", "workbench", str(folder), "--site", str(workbench_site)]),
    )


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def site_toml(name: str, data_root: Path, proposal: MappingProposal, n_rows: int, site_dir: Path) -> str:
    """The text of site.toml: data_root and the proposed [labels], marked for the site to confirm."""
    lines = [
        "# Written by `sarcofed site init`; nothing was copied or moved.",
        f"name = {_toml_string(name)}",
        f"description = {_toml_string(f'Built by sarcofed site init from an export ({n_rows} slices).')}",
        "# manifest.csv paths are relative to this folder (the export), which sarcofed only reads:",
        f"data_root = {_toml_string(str(data_root))}",
        "",
        "# PLEASE CONFIRM: the [labels] below were PROPOSED from the data, value by value:",
        *(f"#   {g.sentence}" for g in proposal.guesses),
    ]
    if proposal.note:
        lines.append(f"# {proposal.note}")
    lines.append(f"# Fix any line that is wrong, then run: sarcofed site check {shlex.quote(str(site_dir))}")
    if proposal.labels is not None:
        lines.append(proposal.toml().rstrip("\n"))
    else:
        roles = {g.value: g.role for g in proposal.guesses}
        lines.append("[labels]  # INCOMPLETE: fill in the values the data could not tell")
        for tissue in ("muscle", "subcutaneous_fat", "visceral_fat"):
            values = ", ".join(str(v) for v, r in roles.items() if r == tissue)
            lines.append(f"{tissue} = [{values}]")
        other = ", ".join(str(v) for v, r in roles.items() if r in ("imat", "background"))
        lines.append(f"background = [{other}]")
    return "\n".join(lines) + "\n"


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _read_pair(
    pair: Pair, acc: LabelValueAccumulator, secret: bytes, source: Path
) -> tuple[dict[str, str] | None, str]:
    """One manifest row for a pair (and its pixels added to ``acc``), or None and why not."""
    image = pair.image.path
    try:
        ct = read_ct_slice(image)
        raw = read_mask(pair.mask, ct_path=image)
    except SliceError as exc:
        return None, f"paired with {image.name} ({pair.how}) but not usable: {exc.detail}"
    if raw.shape != ct.shape:
        return None, (
            f"paired with {image.name} ({pair.how}) but the mask is {raw.shape[0]}x{raw.shape[1]} and "
            f"the image {ct.shape[0]}x{ct.shape[1]}"
        )
    if not raw.any():
        return None, f"paired with {image.name} ({pair.how}) but the mask has no labelled pixel"
    n_values = len(np.unique(raw))
    if n_values > MAX_VALUES:
        return None, (
            f"paired with {image.name} ({pair.how}) but the mask holds {n_values} distinct values; "
            "a label mask holds a few (is it an image?)"
        )
    acc.add(ct.hu, ct.spacing_mm, raw)
    patient = _patient_id(image)
    return {
        "image": _relative(image, source),
        "label": _relative(pair.mask, source),
        "group": patient_group(secret, patient),
        "height_m": f"{ct.height_m:.2f}" if ct.height_m is not None else "",
        "sex": ct.sex or "",
    }, ""


def init_site(
    source: Path | str,
    site_dir: Path | str,
    *,
    name: str | None = None,
    force: bool = False,
    protocol: LabelProtocol = ALBERTA,
    on_pair: Callable[[int, int], None] | None = None,
) -> InitReport:
    """Build ``site_dir`` from the export at ``source``; see the module docstring.

    Raises :class:`SiteInitError` when ``source`` is not a folder or ``site_dir`` already
    holds site.toml / manifest.csv (without ``force``). Nothing is written when no pair is usable.
    """
    source, site_dir = Path(source).expanduser(), Path(site_dir).expanduser()
    if not source.is_dir():
        raise SiteInitError(
            f"{source}: not a folder; give the folder holding the exported CT files and masks"
        )
    existing = [site_dir / f for f in (SITE_TOML, MANIFEST_CSV) if (site_dir / f).exists()]
    if existing and not force:
        raise SiteInitError(
            f"{', '.join(map(str, existing))} already exist; pass --force to replace them, "
            "or choose a new --out"
        )
    source = Path(os.path.abspath(source))
    site_dir = Path(os.path.abspath(site_dir))
    scan: ExportScan = scan_export(source, skip=site_dir)
    secret = read_secret(site_dir) or new_secret()
    acc = LabelValueAccumulator(protocol)
    rows: list[dict[str, str]] = []
    problems = [
        InitProblem(file=_relative(u.path, source), reason=u.reason, detail=u.detail) for u in scan.unpaired
    ]
    used: Counter[str] = Counter()
    for done, pair in enumerate(scan.pairs, start=1):
        row, why = _read_pair(pair, acc, secret, source)
        if row is None:
            problems.append(InitProblem(file=_relative(pair.mask, source), reason=why))
        else:
            rows.append(row)
            used[pair.how] += 1
        if on_pair is not None:
            on_pair(done, len(scan.pairs))
    stats = acc.finalise()
    proposal = propose_mapping(stats, protocol)
    series = [_series_entry(s, source, site_dir) for s in scan.unlabelled_series]
    written: list[str] = []
    if rows:
        site_dir.mkdir(parents=True, exist_ok=True)
        site_name = (name or site_dir.name or "site").strip()[:80] or "site"
        (site_dir / SITE_TOML).write_text(
            site_toml(site_name, source, proposal, len(rows), site_dir), encoding="utf-8"
        )
        _write_manifest(site_dir / MANIFEST_CSV, rows)
        write_secret(site_dir, secret)
        written = [SITE_TOML, MANIFEST_CSV, SECRET_FILE]
    return InitReport(
        source=str(source),
        site_dir=str(site_dir),
        written=written,
        n_rows=len(rows),
        paired_by=dict(sorted(used.items())),
        unpaired=sorted(problems, key=lambda p: p.file),
        series=series,
        mask_values=list(stats),
        proposal=proposal,
        next_command=f"sarcofed site check {shlex.quote(str(site_dir))}" if rows else "",
    )


__all__ = [
    "SECRET_FILE",
    "InitProblem",
    "InitReport",
    "SiteInitError",
    "UnlabelledSeries",
    "init_site",
    "patient_group",
    "site_toml",
]
