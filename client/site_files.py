"""The files a site keeps beside its folder: where they live and how they are written.

A site folder ``/data/hospital-b`` is never written to (its dataset and fingerprint stay as
the hospital made them); what sarcofed keeps about it lives beside it, named after it:
``hospital-b.audit.jsonl`` with its key and anchor (``client.audit``, ``client.audit_anchor``)
and ``hospital-b.releases.jsonl`` (``client.ledger``). :func:`beside_site` names them; every
one is owner-only (mode 0600: :func:`write_private`, :func:`tighten`) and none is ever sent.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

#: Owner read/write only: these files hold what a site exchanged and the keys that protect it.
FILE_MODE = 0o600


def beside_site(site_dir: Path, suffix: str) -> Path:
    """``<parent>/<folder name><suffix>``: a file beside the site folder (``~`` and links resolved)."""
    site = Path(site_dir).expanduser().resolve()
    return site.with_name(site.name + suffix)


def tighten(path: Path) -> None:
    """Make ``path`` owner-only (0600) if others may read or write it, with a warning naming it."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077 == 0:
        return
    try:
        os.chmod(path, FILE_MODE)
    except OSError as err:
        log.warning("%s is mode %04o (others can read it) and cannot be tightened: %s", path, mode, err)
        return
    log.warning("%s was mode %04o (others could read it); tightened to %04o", path, mode, FILE_MODE)


def loose(path: Path) -> bool:
    """Whether ``path`` exists and others may read or write it."""
    try:
        return bool(stat.S_IMODE(os.stat(path).st_mode) & 0o077)
    except FileNotFoundError:
        return False


def write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` with mode 0600 and fsync it (``exclusive``: it must not exist)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tighten(path)  # a file that existed keeps its mode through O_TRUNC


def append_private(path: Path, line: str) -> None:
    """Append one line to ``path`` (made 0600 if new, tightened if loose), flushed and fsync'ed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    tighten(path)


__all__ = ["FILE_MODE", "append_private", "beside_site", "loose", "tighten", "write_private"]
