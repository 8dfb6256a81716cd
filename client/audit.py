"""The site's audit log: every instruction received and every reply sent, append-only.

The log lives *beside* the site folder, never inside it: ``/data/hospital-b`` logs to
``/data/hospital-b.audit.jsonl``, so it never changes the dataset (or its fingerprint)
and survives replacing the folder. One JSON object per line; each line is appended with
``open("a")``, flushed and fsync'ed under an exclusive file lock, and never rotated.
Each entry carries its own digest and the sha256 of the previous line (``prev``), so
``verify_chain`` can tell an edited, inserted or deleted line from an intact log (it
cannot tell a log truncated at the end: keep a copy of the last digest you checked).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

try:  # POSIX; on other systems appends are still atomic enough for one writer
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

AUDIT_SUFFIX = ".audit.jsonl"
GENESIS = "0" * 64

Event = Literal["received", "sent", "refused"]


class AuditEntry(BaseModel):
    """One line of the audit log."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    time: str
    event: Event
    run_id: int
    task: str
    app_hash: str
    payload_sha256: str
    payload: Any = None
    detail: str | None = None
    prev: str = GENESIS
    #: sha256 of this entry without ``digest`` (canonical JSON): an edited field shows.
    digest: str = ""


def entry_digest(entry: Mapping[str, Any]) -> str:
    return payload_sha256({k: v for k, v in entry.items() if k != "digest"})


def audit_path(site_dir: Path) -> Path:
    """``<parent>/<folder name>.audit.jsonl`` beside the site folder."""
    site = Path(site_dir).expanduser().resolve()
    return site.with_name(site.name + AUDIT_SUFFIX)


def canonical_json(payload: Any) -> str:
    """The exact text that is hashed: sorted keys, no whitespace."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def payload_sha256(payload: Any) -> str:
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def _last_line(handle: Any) -> bytes | None:
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    if size == 0:
        return None
    block = min(size, 1 << 16)
    while True:
        handle.seek(size - block)
        tail = handle.read(block).rstrip(b"\n")
        if b"\n" in tail or block == size:
            return tail.rsplit(b"\n", 1)[-1]
        block = min(size, block * 4)


@dataclass(frozen=True)
class AuditLog:
    """Appends entries to one site's audit log."""

    path: Path

    @classmethod
    def for_site(cls, site_dir: Path) -> AuditLog:
        return cls(audit_path(site_dir))

    def append(
        self,
        event: Event,
        *,
        run_id: int,
        task: str,
        app_hash: str,
        payload: Any = None,
        detail: str | None = None,
    ) -> AuditEntry:
        """Append one entry (chained to the previous line) and fsync it before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                last = _last_line(handle)
                prev = hashlib.sha256(last).hexdigest() if last else GENESIS
                entry = AuditEntry(
                    time=datetime.now(UTC).isoformat(timespec="milliseconds"),
                    event=event,
                    run_id=int(run_id),
                    task=task,
                    app_hash=app_hash,
                    payload_sha256=payload_sha256(payload),
                    payload=payload,
                    detail=detail,
                    prev=prev,
                )
                fields = entry.model_dump(mode="json")
                entry = entry.model_copy(update={"digest": entry_digest(fields)})
                line = canonical_json(entry.model_dump(mode="json")) + "\n"
                handle.seek(0, os.SEEK_END)
                handle.write(line.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return entry

    def has_run(self, run_id: int) -> bool:
        """Whether any entry of the log belongs to run ``run_id`` (a missing log has none)."""
        if not self.path.exists():
            return False
        needle = f'"run_id":{int(run_id)}'.encode()  # canonical JSON (no spaces): a cheap pre-filter
        with open(self.path, "rb") as handle:
            for line in handle:
                if needle not in line:
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a damaged line is verify_chain's business, not this question's
                if isinstance(entry, dict) and entry.get("run_id") == int(run_id):
                    return True
        return False


class AuditLogError(ValueError):
    """A line of the audit log is not a valid entry (names the file and line)."""


def read_audit(path: Path) -> Iterator[AuditEntry]:
    """Every entry, in order; a malformed line raises ``AuditLogError`` naming it."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield AuditEntry.model_validate_json(line)
            except ValidationError as err:
                raise AuditLogError(
                    f"{path}:{number}: not an audit entry ({err.error_count()} problem(s))"
                ) from err


def verify_chain(path: Path) -> list[str]:
    """Problems with the hash chain (empty list = intact): edited, inserted or deleted lines."""
    problems: list[str] = []
    prev = GENESIS
    if not path.exists():
        return problems
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.rstrip(b"\n")
            try:
                entry: Mapping[str, Any] = json.loads(line)
            except ValueError:
                problems.append(f"line {number}: not JSON")
                prev = hashlib.sha256(line).hexdigest()
                continue
            if entry.get("prev") != prev:
                problems.append(f"line {number}: does not follow line {number - 1} (edited or removed lines)")
            if entry.get("digest") != entry_digest(entry):
                problems.append(f"line {number}: edited (its digest does not match its fields)")
            if entry.get("payload_sha256") != payload_sha256(entry.get("payload")):
                problems.append(f"line {number}: payload does not match its payload_sha256")
            prev = hashlib.sha256(line).hexdigest()
    return problems
