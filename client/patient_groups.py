"""A site's patient groups: the manifest ``group`` that keeps one patient's slices together.

One owner for the rule that ``sarcofed site init`` and the workbench's "Save to site" both
follow: the group is ``p-`` and an HMAC-SHA256 of the DICOM PatientID under the site's own
secret (``.group-secret`` in the site folder, readable by this account only), so the same
patient gets the same group however their slices reached the site, and the group says nothing
about the PatientID to anyone without the secret (a plain hash of a hospital's patient numbers
is undone by hashing every number). No PatientID: no group.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Final

from common.errors import SiteFolderError

SECRET_FILE: Final = ".group-secret"


def read_secret(site_dir: Path) -> bytes | None:
    """The site's secret, or None when it has none (or an unusable one) yet."""
    path = site_dir / SECRET_FILE
    if path.is_file():
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise SiteFolderError(
                path,
                f"cannot be read as this site's group secret ({err}); every patient group in "
                "manifest.csv depends on it: restore it from a backup, or, for a site whose manifest "
                "you will rebuild with `sarcofed site init --force`, delete it",
            ) from err
        if len(text) >= 32:
            return text.encode("ascii")
    return None


def new_secret() -> bytes:
    return secrets.token_hex(32).encode("ascii")


def write_secret(site_dir: Path, secret: bytes) -> None:
    """Write ``secret`` (mode 0600) unless the file already holds it."""
    path = site_dir / SECRET_FILE
    if path.is_file() and path.read_bytes().strip() == secret:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret + b"\n")
    os.chmod(path, 0o600)


def site_secret(site_dir: Path) -> bytes:
    """The site's secret, made and written on first use."""
    secret = read_secret(site_dir)
    if secret is None:
        secret = new_secret()
        write_secret(site_dir, secret)
    return secret


def patient_group(secret: bytes, patient_id: str) -> str:
    """The manifest ``group`` of a patient (``""`` without a PatientID)."""
    patient_id = patient_id.strip()
    if not patient_id:
        return ""
    return "p-" + hmac.new(secret, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


__all__ = ["SECRET_FILE", "patient_group", "read_secret", "site_secret", "write_secret"]
