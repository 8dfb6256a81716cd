"""Save labelled workbench slices into a site dataset folder, without ever losing or misplacing a file.

:func:`save_to_site` (called by the workbench's "Save to site" route) copies each selected
DICOM file unchanged into ``images/``, writes its mask in the site's own format and values
(``site.toml`` ``[labels]``, first value of each class) into ``labels/``, and adds or replaces
its row in ``manifest.csv``. A new folder gets ``site.toml`` with canonical values 1/2/3.

Safety, because several workbench processes may save into one site and DICOM text is not
to be trusted:

- File names are sarcofed's own, ``wb-<20 hex digits>``: a sha256 of the SOPInstanceUID (of
  the file's bytes when it has none). No DICOM text ever becomes part of a path.
- Every path written is resolved, symbolic links included, and must stay inside the site
  folder (:func:`client.workbench.state.resolve_inside`); otherwise ``OutsideFolderError``.
- The manifest ``group`` is the patient's, as ``sarcofed site init`` makes it
  (:mod:`client.patient_groups`: an HMAC of the PatientID under the site's secret), so a
  patient's slices stay in one group whichever way they reached the site.
- The whole save holds the site's lock file (:data:`LOCK_NAME`, ``filelock``), so saves from
  two processes never interleave; ``manifest.csv`` is re-read inside the lock, and it,
  ``site.toml``, each image and each mask are written to a temporary file and moved into
  place with ``os.replace`` (a reader never sees half a file).
- A ``site.toml`` or ``manifest.csv`` that cannot be read is a :class:`SaveError` naming the
  file and the fix; a site whose ``site.toml`` sets ``data_root`` is refused (its manifest
  points into an export that must stay read only).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import secrets
import shutil
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
from filelock import FileLock, Timeout

from client.patient_groups import patient_group, site_secret
from common.masks import MASK_SUFFIXES, mask_suffix, write_mask
from protocols.site import SiteConfig

from .state import Session, SliceLabels, resolve_inside

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("image", "label", "group", "height_m", "sex")
#: The lock file every workbench process takes before it touches a site folder's files.
LOCK_NAME = ".workbench-save.lock"
#: How long a save waits for another process's save before giving up.
LOCK_TIMEOUT_S = 60.0
NEW_SITE_TOML = 'name = "{name}"\n\n[labels]\nmuscle = [1]\nsubcutaneous_fat = [2]\nvisceral_fat = [3]\n'
_SITE = "the site folder"


class SaveError(ValueError):
    """Saving to the site folder is not possible (the message says what to fix)."""


def slice_stem(file: Path, sop_instance_uid: str) -> str:
    """sarcofed's file name (without suffix) for one saved slice: never DICOM text itself.

    The same SOPInstanceUID always gives the same name, so saving a slice again replaces it.
    """
    if sop_instance_uid:
        digest = hashlib.sha256(b"sop:" + sop_instance_uid.encode("utf-8", "surrogateescape"))
    else:
        digest = hashlib.sha256(b"file:" + file.read_bytes())
    return "wb-" + digest.hexdigest()[:20]


def _replace_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` a temporary file beside ``target`` (same suffix), then move it onto ``target``."""
    tmp = target.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{target.name}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(target: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    _replace_atomically(target, write)


@contextmanager
def _site_lock(site_dir: Path) -> Iterator[None]:
    lock = FileLock(resolve_inside(site_dir, LOCK_NAME, what=_SITE))
    try:
        with lock.acquire(timeout=LOCK_TIMEOUT_S):
            yield
    except Timeout:
        raise SaveError(
            f"{lock.lock_file}: another workbench has been saving into this site for over "
            f"{LOCK_TIMEOUT_S:.0f} s; wait for it to finish and save again"
        ) from None


def site_config(site_dir: Path) -> SiteConfig:
    """``site.toml`` of ``site_dir``; written with canonical values 1/2/3 if the folder is new."""
    path = resolve_inside(site_dir, "site.toml", what=_SITE)
    if not path.exists():
        _write_text(path, NEW_SITE_TOML.format(name=site_dir.name or "site"))
        log.info("created %s", path)
    try:
        return SiteConfig.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except Exception as exc:
        raise SaveError(f"{path}: cannot be used ({exc}); fix site.toml before saving") from exc


def read_manifest(path: Path) -> tuple[list[str], list[dict[str, str]], str]:
    """Header, rows and delimiter of the manifest at ``path`` (the default header if it is new)."""
    if not path.exists():
        return list(MANIFEST_COLUMNS), [], ","
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SaveError(
            f"{path}: is not UTF-8 text ({exc}); save it as UTF-8 CSV (in Excel: 'CSV UTF-8') and "
            "save again. Nothing was written."
        ) from None
    first = text.splitlines()[0] if text.strip() else ""
    delimiter = ";" if first.count(";") > first.count(",") else ","
    try:
        reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
        header = [h.strip().lower() for h in (reader.fieldnames or [])] or list(MANIFEST_COLUMNS)
        rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    except csv.Error as exc:
        raise SaveError(f"{path}: is not a readable CSV ({exc}); fix it and save again") from None
    return header, [r for r in rows if any(r.values())], delimiter


def _mask_suffix(rows: list[dict[str, str]], wanted: str) -> str:
    if wanted and wanted != "auto":
        suffix = wanted if wanted.startswith(".") else f".{wanted}"
        if suffix not in MASK_SUFFIXES:
            raise SaveError(f"mask format {wanted!r} unknown; use one of {', '.join(MASK_SUFFIXES)} or auto")
        return suffix
    suffixes = [mask_suffix(Path(r["label"])) for r in rows if r.get("label")]
    known = [s for s in suffixes if s in MASK_SUFFIXES]
    return max(set(known), key=known.count) if known else ".png"


class _Plan(NamedTuple):
    """Where one slice goes (paths relative to the site folder) and its patient group."""

    image: str
    label: str
    group: str


def _plan(site_dir: Path, item: SliceLabels, suffix: str, secret: bytes) -> _Plan:
    ds = pydicom.dcmread(item.file, stop_before_pixels=True)
    stem = slice_stem(item.file, str(ds.get("SOPInstanceUID", "") or ""))
    group = patient_group(secret, str(ds.get("PatientID", "") or ""))  # as `site init` groups
    plan = _Plan(f"images/{stem}.dcm", f"labels/{stem}{suffix}", group)
    for relative in (plan.image, plan.label):
        resolve_inside(site_dir, relative, what=_SITE)
    return plan


def _target(site_dir: Path, relative: str) -> Path:
    """``site_dir / relative`` checked to stay inside the site, its folder created and re-checked."""
    path = resolve_inside(site_dir, relative, what=_SITE)
    path.parent.mkdir(parents=True, exist_ok=True)
    return resolve_inside(site_dir, relative, what=_SITE)


def save_to_site(
    session: Session, site_dir: Path, *, height_m: float | None, sex: str | None, mask_format: str = "auto"
) -> list[str]:
    """Copy each selected DICOM file into ``site_dir``, write its mask, add/replace its manifest row.

    Returns the manifest ``image`` paths written. Slices with no labelled pixel are refused
    (``common.dataset`` would exclude them as empty masks).
    """
    empty = [item.file.name for item in session.slices if not item.labels.any()]
    if empty:
        raise SaveError(f"no muscle, SAT or VAT pixel in {', '.join(empty)}: label them or leave them out")
    site_dir.mkdir(parents=True, exist_ok=True)
    with _site_lock(site_dir):
        return _save_locked(session, site_dir, height_m=height_m, sex=sex, mask_format=mask_format)


def _save_locked(
    session: Session, site_dir: Path, *, height_m: float | None, sex: str | None, mask_format: str
) -> list[str]:
    config = site_config(site_dir)
    if config.data_root is not None:
        raise SaveError(
            f"{site_dir / 'site.toml'} sets data_root (its manifest points into an export, read only); "
            "the workbench saves copies inside its site folder: give --site another folder"
        )
    values = np.array(
        [0, config.labels.muscle[0], config.labels.subcutaneous_fat[0], config.labels.visceral_fat[0]],
        dtype=np.int64,
    )
    manifest = resolve_inside(site_dir, "manifest.csv", what=_SITE)
    header, rows, delimiter = read_manifest(manifest)
    suffix = _mask_suffix(rows, mask_format)
    header += [c for c in MANIFEST_COLUMNS if c not in header]
    secret = site_secret(site_dir)
    planned = [_plan(site_dir, item, suffix, secret) for item in session.slices]  # all checked before writing
    written: list[str] = []
    for item, plan in zip(session.slices, planned, strict=True):
        image_path = _target(site_dir, plan.image)
        _replace_atomically(image_path, partial(shutil.copyfile, item.file))  # the original bytes
        raw = values[item.labels.astype(np.int64)]
        raw = raw.astype(np.uint8 if raw.max() <= 255 else np.uint16)
        _replace_atomically(_target(site_dir, plan.label), partial(write_mask, mask=raw, ct_path=image_path))
        row = {c: "" for c in header}
        row.update(image=plan.image, label=plan.label, group=plan.group)
        row["height_m"] = f"{height_m:.2f}" if height_m else ""
        row["sex"] = sex or ""
        rows = [r for r in rows if r.get("image") != plan.image] + [row]
        written.append(plan.image)
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=header, delimiter=delimiter, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    _write_text(manifest, buffer.getvalue())
    log.info("saved %d slices to %s", len(written), site_dir)
    return written


__all__ = [
    "LOCK_NAME",
    "MANIFEST_COLUMNS",
    "SaveError",
    "read_manifest",
    "save_to_site",
    "site_config",
    "slice_stem",
]
