"""A site's dataset folder: ``site.toml`` + ``manifest.csv`` -> labelled axial CT slices.

Folder-level problems raise :class:`SiteFolderError` (nothing can be done until the site
fixes them). Row-level problems never stop the site: a row that fails
:class:`ManifestRow` validation is kept in ``SiteDataset.invalid_rows`` and
:func:`iter_slices` yields a :class:`SliceError` for it; a slice whose files cannot be
used raises a :class:`SliceError` from :func:`load_slice` with the reason.

A row is invalid when it fails validation, when its line cannot be read as CSV (an
unbalanced quote: the line is named, and the lines after it are still read one by one), or
when it lists an image an earlier row already lists (``duplicate_row``, naming that line:
a slice counted twice would weigh twice in every pooled number).

``SiteDataset.rows`` holds the *valid* rows only; ``load_slice(site, i)`` takes an index
into it. ``site.n_listed`` counts every data row of manifest.csv (valid or not), and
``iter_slices`` yields exactly ``n_listed`` items: one per valid row, in order, then one
``SliceError`` per invalid row.

Decoded slices are cached at the site (``SiteDataset.cache``, ``common.slice_cache``): a
slice whose files (by content) and ``[labels]`` are unchanged is read back from the cache
instead of being decoded again; the returned arrays are the same, bit for bit.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import tomllib
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from common.dicom_io import CTSlice, read_ct_slice
from common.errors import SiteFolderError, SliceError
from common.masks import read_mask
from common.site_file import require_regular_file
from common.slice_cache import Arrays, SliceCache, open_site_cache
from protocols.classes import ExclusionReason
from protocols.site import MANIFEST_OPTIONAL, MANIFEST_REQUIRED, LabelMap, ManifestRow, SiteConfig

log = logging.getLogger(__name__)

SITE_TOML = "site.toml"
MANIFEST_CSV = "manifest.csv"
#: Reason given to a manifest row that fails validation (blank path, height "abc", sex "X").
#: ``invalid_manifest_row`` is requested in protocols; until it exists the closest code is used.
INVALID_ROW_REASON: ExclusionReason = getattr(
    ExclusionReason, "invalid_manifest_row", ExclusionReason.missing_file
)


#: Manifest columns that name a file (relative to the site folder) or a patient: their values
#: identify people and never leave the site (``client.guard`` screens replies for them).
IDENTIFYING_COLUMNS: tuple[str, ...] = ("image", "label", "reference", "group")


@dataclass(frozen=True)
class InvalidRow:
    """A manifest.csv data row that failed validation (``line`` is the 1-based file line).

    ``values`` are the row's raw cells by (lower-case) column name, as read; ``reason`` is
    ``invalid_manifest_row``, or ``duplicate_row`` for a row listing an image listed above.
    """

    line: int
    image: str
    detail: str
    values: Mapping[str, str] = field(default_factory=dict)
    reason: ExclusionReason = INVALID_ROW_REASON

    def error(self, root: Path) -> SliceError:
        return SliceError(self.reason, root / MANIFEST_CSV, f"line {self.line}: {self.detail}")


@dataclass
class SiteDataset:
    """A parsed site folder. ``rows`` are the valid manifest rows; ``lines`` their file lines."""

    root: Path
    config: SiteConfig
    rows: list[ManifestRow]
    invalid_rows: list[InvalidRow] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    #: where decoded slices are kept between rounds (site.toml ``cache_dir``); ``None``: off.
    cache: SliceCache | None = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_listed(self) -> int:
        """Data rows in manifest.csv, valid or not."""
        return len(self.rows) + len(self.invalid_rows)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def data_root(self) -> Path:
        """The folder manifest paths are relative to: site.toml's ``data_root`` (absolute, or
        relative to the site folder), else the site folder."""
        given = self.config.data_root
        return self.root if given is None else self.root / Path(given).expanduser()

    def listed(self, column: str) -> list[str]:
        """Every non-blank value of ``column`` in manifest.csv, valid rows first, then invalid ones."""
        valid = [getattr(row, column, None) for row in self.rows]
        invalid = [row.values.get(column) for row in self.invalid_rows]
        return [str(v).strip() for v in (*valid, *invalid) if v is not None and str(v).strip()]


@dataclass
class LoadedSlice:
    """One usable slice: CT in HU, canonical label (0-3) and optional reference mask."""

    index: int
    row: ManifestRow
    ct: CTSlice
    label: np.ndarray
    reference: np.ndarray | None
    group: str
    height_m: float | None
    sex: str | None
    #: Distinct raw site values found in the label mask (before mapping), for ``site check``.
    label_values: tuple[int, ...] = ()
    #: The label mask's raw site values (before mapping), for ``site check``'s mapping guess.
    raw_label: np.ndarray | None = None


# ------------------------------------------------------------------ folder
def _location(error: dict[str, object]) -> str:
    loc = error.get("loc", ())
    return ".".join(str(part) for part in loc) if isinstance(loc, tuple) and loc else "(top level)"


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        got = "" if error["type"] == "missing" else f" (got {error.get('input')!r})"
        parts.append(f"{_location(dict(error))}: {error['msg']}{got}")
    return "; ".join(parts)


def _load_config(root: Path) -> SiteConfig:
    path = root / SITE_TOML
    if not path.is_file():
        raise SiteFolderError(
            path,
            "site.toml is missing: create it with a 'name' and a [labels] table that maps your mask "
            "values to muscle, subcutaneous_fat and visceral_fat (see the site-dataset contract)",
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SiteFolderError(path, f"site.toml is not valid TOML: {exc}") from exc
    try:
        return SiteConfig.model_validate(raw)
    except ValidationError as exc:
        raise SiteFolderError(
            path, f"site.toml does not fit the contract: {_format_validation(exc)}"
        ) from exc


def _csv_cells(line: str, delimiter: str) -> list[str]:
    """The cells of one physical line of manifest.csv; ``ValueError`` saying what is wrong.

    Each line is parsed on its own (strict CSV): a quote that a line opens and never closes
    is that line's error, and cannot swallow the rows below it into one cell.
    """
    try:
        return next(csv.reader([line], delimiter=delimiter, strict=True), [])
    except csv.Error as exc:
        hint = (
            'it holds an unbalanced quote ("): remove it or close it'
            if line.count('"') % 2
            else "check the quotes around its cells"
        )
        raise ValueError(f"not valid CSV ({exc}); {hint}") from None


def _read_manifest(root: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]], list[InvalidRow]]:
    """Header, the data rows by file line, and the lines that cannot be read as CSV."""
    path = root / MANIFEST_CSV
    if not path.is_file():
        raise SiteFolderError(
            path,
            f"manifest.csv is missing: list one slice per row with columns {', '.join(MANIFEST_REQUIRED)}",
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SiteFolderError(path, f"manifest.csv is not UTF-8 text ({exc}); save it as UTF-8 CSV") from exc
    # Physical lines as a text editor numbers them (\n, \r\n or \r), not str.splitlines(),
    # which also splits at form feeds and other separators a cell may hold.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    first = lines[0]
    if not first.strip() and len(lines) == 1:
        raise SiteFolderError(path, "manifest.csv is empty: it needs a header row and one row per slice")
    delimiter = ";" if first.count(";") > first.count(",") else ","
    try:
        header = [h.strip().lower() for h in _csv_cells(first, delimiter)]
    except ValueError as exc:
        raise SiteFolderError(path, f"the header row (line 1) is {exc}") from None
    missing = [c for c in MANIFEST_REQUIRED if c not in header]
    if missing:
        raise SiteFolderError(
            path,
            f"manifest.csv has no column {', '.join(repr(c) for c in missing)} (found columns: "
            f"{', '.join(header) or 'none'}); required: {', '.join(MANIFEST_REQUIRED)}, optional: "
            f"{', '.join(MANIFEST_OPTIONAL)}",
        )
    rows: list[tuple[int, dict[str, str]]] = []
    broken: list[InvalidRow] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            values = _csv_cells(line, delimiter)
        except ValueError as exc:
            # Its cells as best they can be told (split at the delimiter, quotes dropped): they
            # may name files or patients, and the guard screens replies for every listed value.
            cells = line.replace('"', "").split(delimiter)
            named = {name: (cells[i].strip() if i < len(cells) else "") for i, name in enumerate(header)}
            broken.append(
                InvalidRow(line=number, image=named.get("image", ""), detail=str(exc), values=named)
            )
            continue
        if not any(v.strip() for v in values):
            continue
        rows.append(
            (number, {name: (values[i].strip() if i < len(values) else "") for i, name in enumerate(header)})
        )
    if not rows and not broken:
        raise SiteFolderError(path, "manifest.csv lists no slices: add one row per labelled L3 slice")
    return header, rows, broken


def load_site(root: Path | str) -> SiteDataset:
    """Parse ``site.toml`` and ``manifest.csv``; raise ``SiteFolderError`` saying what to fix."""
    root = Path(root)
    if not root.exists():
        raise SiteFolderError(root, "site folder does not exist")
    if not root.is_dir():
        raise SiteFolderError(
            root, "is a file; point sarcofed at the folder holding site.toml and manifest.csv"
        )
    config = _load_config(root)
    if config.data_root is not None and not (root / Path(config.data_root).expanduser()).is_dir():
        raise SiteFolderError(
            root / SITE_TOML,
            f"data_root = {config.data_root!r} is not a folder: give the folder that manifest paths are "
            "relative to (absolute, or relative to the site folder), or remove the line",
        )
    _, raw_rows, broken = _read_manifest(root)
    rows: list[ManifestRow] = []
    lines: list[int] = []
    invalid: list[InvalidRow] = []
    first_line: dict[str, int] = {}  # normalised image path -> the line that lists it first
    for line, values in raw_rows:
        try:
            row = ManifestRow.model_validate(values)
        except ValidationError as exc:
            detail = _format_validation(exc)
            log.warning("%s line %d: %s", root / MANIFEST_CSV, line, detail)
            invalid.append(InvalidRow(line=line, image=values.get("image", ""), detail=detail, values=values))
            continue
        key = os.path.normpath(row.image.strip().replace("\\", "/"))
        if key in first_line:
            detail = (
                f"image {row.image!r} is already listed on line {first_line[key]}; list each slice once "
                "(a second rater's mask goes in that row's 'reference' column)"
            )
            log.warning("%s line %d: %s", root / MANIFEST_CSV, line, detail)
            invalid.append(
                InvalidRow(
                    line=line,
                    image=row.image,
                    detail=detail,
                    values=values,
                    reason=ExclusionReason.duplicate_row,
                )
            )
            continue
        first_line[key] = line
        rows.append(row)
        lines.append(line)
    for bad in broken:
        log.warning("%s line %d: %s", root / MANIFEST_CSV, bad.line, bad.detail)
    invalid = sorted([*invalid, *broken], key=lambda bad: bad.line)
    return SiteDataset(
        root=root,
        config=config,
        rows=rows,
        invalid_rows=invalid,
        lines=lines,
        cache=open_site_cache(root, config.cache_dir, max_bytes=config.cache_max_mb * 2**20),
    )


# ------------------------------------------------------------------ slices
def resolve_path(
    site: SiteDataset, relative: str, reason: ExclusionReason = ExclusionReason.missing_file
) -> Path:
    """Path of a manifest entry inside the site's data root; refuse absolute or escaping paths.

    The data root is the site folder unless site.toml sets ``data_root`` (``SiteDataset.data_root``).
    """
    text = relative.strip().replace("\\", "/")
    where = "the site folder" if site.config.data_root is None else "data_root (site.toml)"
    if os.path.isabs(text) or (len(text) > 1 and text[1] == ":"):
        raise SliceError(
            reason,
            Path(text),
            f"absolute path in manifest.csv; paths must be relative to {where} "
            "(copy or link the file inside it)",
        )
    root = os.path.normpath(os.path.abspath(site.data_root))
    full = os.path.normpath(os.path.join(root, text))
    if os.path.commonpath([root, full]) != root:
        raise SliceError(
            reason,
            Path(text),
            f"path leaves {where} ('..'); every file must sit inside it",
        )
    return Path(full)


def map_labels(raw: np.ndarray, labels: LabelMap, path: Path | str) -> np.ndarray:
    """Map raw site values to canonical classes (uint8 0-3) through ``[labels]``.

    A value declared nowhere raises ``SliceError(undeclared_label_value)`` naming the file
    and the value(s).
    """
    table = labels.lookup()
    values = np.unique(raw)
    undeclared = [int(v) for v in values if int(v) not in table]
    if undeclared:
        shown = ", ".join(str(v) for v in undeclared[:10]) + (" ..." if len(undeclared) > 10 else "")
        raise SliceError(
            ExclusionReason.undeclared_label_value,
            path,
            f"mask holds value(s) {shown} declared nowhere in site.toml [labels]; add each to muscle, "
            "subcutaneous_fat, visceral_fat or background (0 is always background)",
        )
    mapped = np.array([table[int(v)] for v in values], dtype=np.uint8)
    return mapped[np.searchsorted(values, raw)]


def _mapped_mask(
    site: SiteDataset, relative: str, ct: CTSlice, ct_path: Path, reason: ExclusionReason | None
) -> tuple[np.ndarray, tuple[int, ...], np.ndarray]:
    """Read, shape-check and map one mask: (canonical, raw values, raw mask). ``reason`` overrides
    every error's reason (reference)."""
    try:
        path = resolve_path(site, relative)
        raw = read_mask(path, ct_path=ct_path)
        if raw.shape != ct.shape:
            raise SliceError(
                ExclusionReason.shape_mismatch,
                path,
                f"mask is {raw.shape[0]}x{raw.shape[1]} but the image {ct_path.name} is "
                f"{ct.shape[0]}x{ct.shape[1]} (rows x columns); was it resampled or drawn on another slice?",
            )
        values = tuple(int(v) for v in np.unique(raw))
        return map_labels(raw, site.config.labels, path), values, raw
    except SliceError as exc:
        if reason is None:
            raise
        raise SliceError(reason, exc.path, f"reference mask: {exc.detail}") from exc


def row_group(site: SiteDataset, index: int) -> str:
    """The patient key of valid row ``index``: its ``group``, or its image path when it has none.

    Keyed by the image, not the row's position: the split (``common.splits``) then does not
    depend on row order, and the release ledger sees a replaced or edited row as another
    patient. The key never leaves the site in clear (the split and the ledger hash it).
    """
    row = site.rows[index]
    return row.group or f"image:{row.image}"


# ------------------------------------------------------------------ cached decoding
def _optional(value: float | str | None, dtype: str) -> np.ndarray:
    """An optional scalar as a 0- or 1-element array (``np.savez`` stores no ``None``)."""
    return np.array([] if value is None else [value], dtype=dtype)


def _scalar(array: np.ndarray) -> float | str | None:
    return None if array.size == 0 else array[0].item()


def _slice_arrays(ct: CTSlice, label: np.ndarray, values: tuple[int, ...], raw: np.ndarray) -> Arrays:
    return {
        "hu": ct.hu,
        "spacing_mm": np.array(ct.spacing_mm, dtype=np.float64),
        "height_m": _optional(ct.height_m, "float64"),
        "sex": _optional(ct.sex, "U"),
        "slice_location": _optional(ct.slice_location, "float64"),
        "sop_instance_uid": _optional(ct.sop_instance_uid, "U"),
        "frame_of_reference_uid": _optional(ct.frame_of_reference_uid, "U"),
        "label": label,
        "label_values": np.array(values, dtype=np.int64),
        "raw_label": raw,
    }


def _slice_from_arrays(
    arrays: Arrays, image_path: Path
) -> tuple[CTSlice, np.ndarray, tuple[int, ...], np.ndarray]:
    spacing = arrays["spacing_mm"]
    ct = CTSlice(
        hu=arrays["hu"],
        spacing_mm=(float(spacing[0]), float(spacing[1])),
        height_m=_float_or_none(_scalar(arrays["height_m"])),
        sex=_str_or_none(_scalar(arrays["sex"])),
        slice_location=_float_or_none(_scalar(arrays["slice_location"])),
        path=image_path,
        sop_instance_uid=_str_or_none(_scalar(arrays["sop_instance_uid"])),
        frame_of_reference_uid=_str_or_none(_scalar(arrays["frame_of_reference_uid"])),
    )
    values = tuple(int(v) for v in arrays["label_values"])
    return ct, arrays["label"], values, arrays["raw_label"]


def _float_or_none(value: float | str | None) -> float | None:
    return None if value is None else float(value)


def _str_or_none(value: float | str | None) -> str | None:
    return None if value is None else str(value)


def _decode_slice(
    site: SiteDataset, row: ManifestRow, image_path: Path
) -> tuple[CTSlice, np.ndarray, tuple[int, ...], np.ndarray]:
    """The CT, canonical label, raw label values and raw label of a row, from the cache if it
    holds them (same files by content, same ``[labels]``), else decoded and then cached."""
    cache = site.cache
    files: list[Path] = []
    key = None
    if cache is not None:
        try:
            files = [image_path, resolve_path(site, row.label)]
        except SliceError:
            files = []  # the decoder below refuses the row with the right reason and order
        key = cache.key("slice", files, site.config.labels.lookup()) if files else None
        cached = cache.get(key) if key is not None else None
        if cached is not None:
            try:
                return _slice_from_arrays(cached, image_path)
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                log.warning("slice cache: entry for %s is incomplete (%s); decoding again", image_path, exc)
    ct = read_ct_slice(image_path)
    label, values, raw = _mapped_mask(site, row.label, ct, image_path, reason=None)
    if (
        cache is not None
        and key is not None
        and cache.key("slice", files, site.config.labels.lookup()) == key
    ):
        # Stored only if no file changed while it was decoded: the entry matches its key.
        cache.put(key, _slice_arrays(ct, label, values, raw))
    return ct, label, values, raw


def _decode_reference(site: SiteDataset, item: LoadedSlice, reference: str) -> np.ndarray:
    """The row's mapped reference mask, from the cache or read (then cached)."""
    cache = site.cache
    files: list[Path] = []
    key = None
    if cache is not None:
        try:
            files = [item.ct.path, resolve_path(site, reference)]
        except SliceError:
            files = []
        key = cache.key("reference", files, site.config.labels.lookup()) if files else None
        cached = cache.get(key) if key is not None else None
        if cached is not None and "reference" in cached:
            return cached["reference"]
    mapped, _, _ = _mapped_mask(
        site, reference, item.ct, item.ct.path, reason=ExclusionReason.unreadable_reference
    )
    if (
        cache is not None
        and key is not None
        and cache.key("reference", files, site.config.labels.lookup()) == key
    ):
        cache.put(key, {"reference": mapped})
    return mapped


def load_reference(site: SiteDataset, item: LoadedSlice) -> np.ndarray | None:
    """The row's reference mask, mapped like its label; ``None`` when the row has none.

    Raises ``SliceError(unreadable_reference)`` naming the reference file when it cannot be
    read or does not fit the image (``site check`` reports it; ``compare`` drops the row).
    """
    if not item.row.reference:
        return None
    return _decode_reference(site, item, item.row.reference)


def load_slice(site: SiteDataset, index: int, *, with_reference: bool = False) -> LoadedSlice:
    """Load valid row ``index`` (0-based into ``site.rows``); raise ``SliceError`` if unusable."""
    row = site.rows[index]
    image_path = resolve_path(site, row.image)
    ct, label, values, raw = _decode_slice(site, row, image_path)
    if not label.any():
        raise SliceError(
            ExclusionReason.empty_mask,
            resolve_path(site, row.label),
            f"no muscle, subcutaneous or visceral fat pixel after mapping (values found: "
            f"{', '.join(map(str, values))}); is [labels] in site.toml right?",
        )
    loaded = LoadedSlice(
        index=index,
        row=row,
        ct=ct,
        label=label,
        reference=None,
        group=row_group(site, index),
        height_m=row.height_m if row.height_m is not None else ct.height_m,
        sex=row.sex if row.sex is not None else ct.sex,
        label_values=values,
        raw_label=raw,
    )
    if with_reference:
        loaded.reference = load_reference(site, loaded)
    return loaded


def iter_slices(
    site: SiteDataset, *, with_reference: bool = False, rows: Collection[int] | None = None
) -> Iterator[LoadedSlice | SliceError]:
    """Every manifest row in turn: a ``LoadedSlice`` or the ``SliceError`` saying why not.

    ``rows``: only these valid rows (indices into ``site.rows``, e.g. a patient split's test
    part), in order; invalid rows belong to no part and are not yielded then.
    """
    indices = range(len(site.rows)) if rows is None else sorted(rows)
    for index in indices:
        try:
            yield load_slice(site, index, with_reference=with_reference)
        except SliceError as exc:
            log.info("excluded %s: %s (%s)", exc.path, exc.reason.value, exc.detail)
            yield exc
    if rows is None:
        for invalid in site.invalid_rows:
            yield invalid.error(site.root)


# ------------------------------------------------------------------ fingerprint
def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    try:  # regular files of a slice's size only: a FIFO or /dev/zero would never end
        require_regular_file(path, ExclusionReason.missing_file, "file")
    except SliceError:
        return "missing"
    try:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return "missing"
    return digest.hexdigest()


def dataset_fingerprint(site: SiteDataset) -> str:
    """Short sha256 over the sorted content hashes of the used files plus the label map.

    File names and paths never enter it (they must not leave the site): renaming or moving
    files keeps the fingerprint; changing any byte of an image or mask changes it.
    """
    digests: list[str] = []
    for row in site.rows:
        for relative in (row.image, row.label, row.reference):
            if not relative:
                continue
            try:
                digests.append(_file_digest(resolve_path(site, relative)))
            except SliceError:
                digests.append("outside")
    labels = json.dumps(sorted(site.config.labels.lookup().items()))
    combined = hashlib.sha256("\n".join([*sorted(digests), labels]).encode("ascii"))
    return combined.hexdigest()[:16]


__all__ = [
    "IDENTIFYING_COLUMNS",
    "INVALID_ROW_REASON",
    "InvalidRow",
    "LoadedSlice",
    "SiteDataset",
    "dataset_fingerprint",
    "iter_slices",
    "load_reference",
    "load_site",
    "load_slice",
    "map_labels",
    "resolve_path",
    "row_group",
]
