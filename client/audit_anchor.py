"""What makes the site's audit log tamper-evident: its secret key and its anchor.

``client.audit`` keys its chain with the site's audit key and rewrites the anchor on every
append; ``sarcofed site audit`` verifies against the stored anchor or one the site
exported and kept elsewhere (``--anchor FILE``, ``--export-anchor FILE``).

- The key (``hospital-b.audit.key`` beside ``hospital-b.audit.jsonl``): 32 random bytes,
  hex, mode 0600, made on first use, never sent. ``key_id`` names it without revealing it.
- The anchor (``hospital-b.audit.anchor.json``): how many entries the log held, the HMAC of
  the last one and the key's id, MAC'ed with the key. A copy kept elsewhere shows a log
  that was cut at the end, rewritten, or replaced together with its key.

All three files are created 0600 (``client.site_files``); ``client.site_files.tighten`` makes an
existing looser one 0600 and warns.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from client.site_files import write_private

log = logging.getLogger(__name__)

KEY_BYTES = 32


class AuditLogError(ValueError):
    """The audit log, its key or its anchor is unusable (names the file and what to do)."""


class Anchor(BaseModel):
    """How far the log went when the anchor was taken: entry count and the last entry's HMAC.

    ``key_id`` names the key (a hash of it, never the key); ``mac`` is the HMAC of the other
    fields, so an edited anchor shows.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["sarcofed-audit-anchor/1"] = "sarcofed-audit-anchor/1"
    #: The log's file name (for people; never a path).
    log: str
    entries: int
    last: str
    key_id: str
    time: str
    mac: str = ""


def _stem(log_path: Path) -> Path:
    return log_path.with_name(log_path.name.removesuffix(".jsonl"))


def key_path(log_path: Path) -> Path:
    """The chain key beside the log: ``hospital-b.audit.jsonl`` -> ``hospital-b.audit.key``."""
    stem = _stem(Path(log_path))
    return stem.with_name(stem.name + ".key")


def anchor_path(log_path: Path) -> Path:
    """The stored anchor beside the log: ``hospital-b.audit.anchor.json``."""
    stem = _stem(Path(log_path))
    return stem.with_name(stem.name + ".anchor.json")


def mac(key: bytes, data: bytes) -> str:
    """HMAC-SHA256 of ``data`` with ``key``, hex."""
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """A public name for a key (16 hex characters of a hash of it): says which key, reveals nothing."""
    return hashlib.sha256(b"sarcofed audit key id\0" + key).hexdigest()[:16]


def read_key(path: Path) -> bytes | None:
    """The key at ``path``, ``None`` when there is none; a damaged key raises ``AuditLogError``."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise AuditLogError(f"{path}: cannot read the audit key ({err})") from err
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise AuditLogError(f"{path}: not an audit key (64 hex characters expected); restore it from backup")
    return key


def new_key(path: Path) -> bytes:
    """Make a fresh key at ``path`` (0600; it must not exist yet)."""
    key = secrets.token_bytes(KEY_BYTES)
    write_private(path, (key.hex() + "\n").encode("ascii"), exclusive=True)
    log.info("%s: made this site's audit key (mode 0600; it never leaves the site)", path)
    return key


def _anchor_mac(key: bytes, anchor: Anchor) -> str:
    fields = (anchor.format, anchor.log, str(anchor.entries), anchor.last, anchor.key_id, anchor.time)
    return mac(key, "\n".join(fields).encode("utf-8"))


def make_anchor(key: bytes, log_name: str, entries: int, last: str) -> Anchor:
    """The anchor of a log of ``entries`` lines whose last line has HMAC ``last``, MAC'ed, taken now."""
    unsigned = Anchor(
        log=log_name,
        entries=entries,
        last=last,
        key_id=key_id(key),
        time=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return unsigned.model_copy(update={"mac": _anchor_mac(key, unsigned)})


def write_anchor(path: Path, anchor: Anchor) -> None:
    """Replace the anchor at ``path`` atomically (0600)."""
    tmp = path.with_name(path.name + ".tmp")
    write_private(tmp, (anchor.model_dump_json(indent=2) + "\n").encode("utf-8"))
    os.replace(tmp, path)


def read_anchor(path: Path) -> Anchor:
    """An anchor file (stored or exported); ``AuditLogError`` naming it when it is not one."""
    try:
        return Anchor.model_validate_json(Path(path).read_bytes())
    except OSError as err:
        raise AuditLogError(f"{path}: cannot read the anchor ({err.strerror})") from err
    except ValidationError as err:
        raise AuditLogError(
            f"{path}: not a sarcofed audit anchor ({err.error_count()} problem(s)); export one with "
            "`sarcofed site audit SITE --export-anchor FILE`"
        ) from err


def anchor_problem(anchor: Anchor, key: bytes, entries: int, link_at_anchor: str | None) -> str | None:
    """Why a log of ``entries`` lines disagrees with ``anchor`` (``None`` = it agrees).

    ``link_at_anchor`` is the HMAC of the log's line number ``anchor.entries``, or ``None``
    when it is not known (then the key, the anchor's own MAC and the count are checked).
    """
    if anchor.key_id != key_id(key):
        return (
            f"the anchor was taken with another audit key (id {anchor.key_id}, this key is {key_id(key)}): "
            "the key was replaced, so the log may have been rewritten"
        )
    if anchor.mac != _anchor_mac(key, anchor):
        return "the anchor was edited (its MAC does not match)"
    if entries < anchor.entries:
        return (
            f"the log ends before entry {anchor.entries} the anchor saw (it holds {entries}): "
            "entries were cut from the end"
        )
    if link_at_anchor is not None and link_at_anchor != anchor.last:
        return f"entry {anchor.entries} is not the one the anchor saw: the log was rewritten"
    return None
