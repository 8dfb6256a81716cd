"""The site's audit log: every instruction received and every reply sent, append-only.

The log lives *beside* the site folder, never inside it: ``/data/hospital-b`` logs to
``/data/hospital-b.audit.jsonl``, so it never changes the dataset (or its fingerprint)
and survives replacing the folder. One JSON object per line, appended under an exclusive
lock on the log, flushed and fsync'ed, never rotated. Callers: ``client.guard`` appends
(``AuditLog.append``), ``sarcofed site audit`` reads and verifies (``read_audit``,
``verify_log``), ``AuditLog.has_run`` answers "is this run new?".

Three files, all mode 0600 (a looser log, key or anchor is tightened on the next append,
with a warning naming it), none ever sent; ``client.audit_anchor`` owns the key and anchor:

- ``hospital-b.audit.jsonl``: the entries. Each carries ``seq`` (its line number),
  ``prev`` = HMAC-SHA256(key, previous line) and ``digest`` = HMAC-SHA256(key, its own
  fields): a keyed chain (``chain = "hmac-sha256"``).
- ``hospital-b.audit.key``: the site's secret chain key (32 random bytes, hex), made on
  the first append. Without it nobody can recompute the chain.
- ``hospital-b.audit.anchor.json``: the anchor, rewritten on every append: how many
  entries the log holds and the HMAC of the last one, itself MAC'ed with the key.
  ``sarcofed site audit --export-anchor`` writes a copy to keep *elsewhere* (another
  machine, a ticket, paper); ``--anchor FILE`` verifies the log against such a copy.

Logs written before the chain was keyed (no ``chain`` field: ``prev``/``digest`` are plain
sha256) are still read and verified and reported as unkeyed; new entries appended to
them are keyed, and the first keyed entry's HMAC ``prev`` pins every unkeyed line before it.

What someone with write access to the folder holding the log can and cannot do:

- cannot edit, insert, reorder or delete an entry, nor rewrite the whole log with a
  recomputed chain, unnoticed, as long as they cannot read the key (0600, owned by the
  account sarcofed runs as): ``verify_log`` names each line that does not check;
- cannot cut entries from the end unnoticed: the stored anchor (MAC'ed) still counts them,
  ``verify_log`` reports "the log ends before entry N the anchor saw", and the next append
  refuses to continue the log (the site answers nothing until someone looks);
- *can* delete or replace the log, key and anchor together (the site then looks like one
  that never logged anything), or put back an older copy of the anchor after cutting the
  log to match it: both are detectable only against an anchor kept elsewhere, which
  records the entry count, the last entry's HMAC and the key's id;
- with the key itself (the sarcofed account, root) *can* forge entries after the last
  anchor kept elsewhere, but not change any entry up to it: that anchor's HMAC fixes
  every line before it;
- can always stop the site (delete or damage the files): appends then fail and the
  ClientApp replies with an error; nothing leaves unaudited.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from client.audit_anchor import (
    Anchor,
    AuditLogError,
    anchor_path,
    anchor_problem,
    key_path,
    mac,
    make_anchor,
    new_key,
    read_anchor,
    read_key,
    write_anchor,
)
from client.site_files import FILE_MODE, beside_site, loose, tighten

try:  # POSIX; on other systems appends are still atomic enough for one writer
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

AUDIT_SUFFIX = ".audit.jsonl"
GENESIS = "0" * 64

Event = Literal["received", "sent", "refused"]
#: ``sha256``: an entry written before the chain was keyed; ``hmac-sha256``: a keyed entry.
Chain = Literal["sha256", "hmac-sha256"]
KEYED: Chain = "hmac-sha256"


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
    #: The line number of this entry (keyed entries only): a removed or inserted line shows.
    seq: int | None = None
    chain: Chain = "sha256"
    #: HMAC (keyed) or sha256 (unkeyed) of the previous line; ``GENESIS`` on the first.
    prev: str = GENESIS
    #: HMAC (keyed) or sha256 (unkeyed) of this entry without ``digest`` (canonical JSON).
    digest: str = ""


def entry_digest(entry: Mapping[str, Any]) -> str:
    """The unkeyed digest of an entry (logs written before the chain was keyed)."""
    return payload_sha256({k: v for k, v in entry.items() if k != "digest"})


def audit_path(site_dir: Path) -> Path:
    """``<parent>/<folder name>.audit.jsonl`` beside the site folder."""
    return beside_site(site_dir, AUDIT_SUFFIX)


def canonical_json(payload: Any) -> str:
    """The exact text that is hashed: sorted keys, no whitespace."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def payload_sha256(payload: Any) -> str:
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def _keyed_digest(key: bytes, fields: Mapping[str, Any]) -> str:
    return mac(key, canonical_json({k: v for k, v in fields.items() if k != "digest"}).encode("utf-8"))


def _last_line(handle: BinaryIO) -> bytes | None:
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


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _count_lines(handle: BinaryIO) -> int:
    handle.seek(0)
    return sum(1 for _ in handle)


@dataclass(frozen=True)
class AuditLog:
    """Appends entries to one site's audit log (and keeps its key and anchor beside it)."""

    path: Path

    @classmethod
    def for_site(cls, site_dir: Path) -> AuditLog:
        return cls(audit_path(site_dir))

    @property
    def key_path(self) -> Path:
        return key_path(self.path)

    @property
    def anchor_path(self) -> Path:
        return anchor_path(self.path)

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
        """Append one keyed entry, fsync it and update the anchor before returning.

        Refuses (``AuditLogError``) to continue a log that was cut or rewritten since its
        stored anchor, or a keyed log whose key is gone: nothing is appended then.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, FILE_MODE)
        with os.fdopen(fd, "a+b") as handle:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                for path in (self.path, self.key_path, self.anchor_path):
                    tighten(path)
                last = _last_line(handle)
                last_entry = _parse(last) if last else None
                key = self._key(last_entry)
                if last is None:
                    seq = 1
                elif last_entry is not None and last_entry.get("chain") == KEYED:
                    seq = int(last_entry.get("seq") or 0) + 1
                else:  # unkeyed or damaged last line: count (once, when a log is first keyed)
                    seq = _count_lines(handle) + 1
                self._check_anchor(key, seq - 1, last)
                entry = AuditEntry(
                    time=datetime.now(UTC).isoformat(timespec="milliseconds"),
                    event=event,
                    run_id=int(run_id),
                    task=task,
                    app_hash=app_hash,
                    payload_sha256=payload_sha256(payload),
                    payload=payload,
                    detail=detail,
                    seq=seq,
                    chain=KEYED,
                    prev=mac(key, last) if last is not None else GENESIS,
                )
                entry = entry.model_copy(update={"digest": _keyed_digest(key, entry.model_dump(mode="json"))})
                line = canonical_json(entry.model_dump(mode="json")).encode("utf-8")
                handle.seek(0, os.SEEK_END)
                if handle.tell() > 0:  # a line cut short by a crash ends here, not in ours
                    handle.seek(-1, os.SEEK_END)
                    if handle.read(1) != b"\n":
                        handle.write(b"\n")
                handle.write(line + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
                write_anchor(self.anchor_path, make_anchor(key, self.path.name, seq, mac(key, line)))
            finally:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return entry

    def _key(self, last_entry: Mapping[str, Any] | None) -> bytes:
        """The chain key; made (0600) on first use, but never for a log that was keyed before."""
        key = read_key(self.key_path)
        if key is not None:
            return key
        if last_entry is not None and last_entry.get("chain") == KEYED:
            raise AuditLogError(
                f"{self.key_path}: the audit key is missing but {self.path.name} is keyed; restore the key "
                "from backup (nothing is appended to a log whose chain cannot be continued)"
            )
        if self.anchor_path.exists():
            raise AuditLogError(
                f"{self.anchor_path}: an anchor exists but the audit key is missing; the log or its key was "
                f"deleted or replaced. Check with `sarcofed site audit --verify`; to start a new log on "
                "purpose, move the log, key and anchor aside together"
            )
        return new_key(self.key_path)

    def _check_anchor(self, key: bytes, entries: int, last: bytes | None) -> None:
        """Refuse to continue a log that holds less than its stored anchor saw, or other lines."""
        if not self.anchor_path.exists():
            return
        anchor = read_anchor(self.anchor_path)
        # the last line's HMAC is at hand; an anchor older than the last line (a crash between
        # the two writes) is checked by its count only
        link = mac(key, last) if last is not None and entries == anchor.entries else None
        problem = anchor_problem(anchor, key, entries, link)
        if problem:
            raise AuditLogError(
                f"{self.path}: {problem} (stored anchor {self.anchor_path.name}); nothing is appended. "
                "Check with `sarcofed site audit --verify` and restore the log from backup"
            )

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
                    continue  # a damaged line is verify_log's business, not this question's
                if isinstance(entry, dict) and entry.get("run_id") == int(run_id):
                    return True
        return False


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


@dataclass(frozen=True)
class AnchorCheck:
    """One anchor compared with the log: where it came from and what was found."""

    source: str
    entries: int
    time: str
    problem: str | None


@dataclass(frozen=True)
class AuditVerification:
    """What ``verify_log`` found: the chain's kind, its problems, and the anchors compared."""

    path: Path
    entries: int
    keyed_entries: int
    key_present: bool
    problems: tuple[str, ...]
    anchors: tuple[AnchorCheck, ...] = ()
    #: The anchor of the log as it is now (``None`` for an unkeyed log or without the key).
    current_anchor: Anchor | None = None
    #: Files of the log that others can read (tightened on the next append).
    loose: tuple[str, ...] = ()

    @property
    def intact(self) -> bool:
        return not self.problems

    @property
    def chain(self) -> str:
        """``keyed``, ``unkeyed`` (an older sarcofed's log), ``partly keyed`` or ``empty``."""
        if self.entries == 0:
            return "empty"
        if self.keyed_entries == 0:
            return "unkeyed"
        return "keyed" if self.keyed_entries == self.entries else "partly keyed"

    def to_json(self) -> dict[str, Any]:
        return {
            "log": str(self.path),
            "entries": self.entries,
            "chain": self.chain,
            "keyed_entries": self.keyed_entries,
            "key_present": self.key_present,
            "intact": self.intact,
            "problems": list(self.problems),
            "anchors": [asdict(a) for a in self.anchors],
            "current_anchor": self.current_anchor.model_dump() if self.current_anchor else None,
            "loose_permissions": list(self.loose),
        }


def _check_line(
    number: int, entry: Mapping[str, Any], line: bytes, previous: bytes | None, key: bytes | None
) -> list[str]:
    problems: list[str] = []
    if entry.get("chain") == KEYED:
        if key is not None:
            expected = mac(key, previous) if previous is not None else GENESIS
            if entry.get("prev") != expected:
                problems.append(f"line {number}: does not follow line {number - 1} (edited or removed lines)")
            if entry.get("digest") != _keyed_digest(key, entry):
                problems.append(f"line {number}: edited (its HMAC does not match its fields)")
        if entry.get("seq") != number:
            problems.append(
                f"line {number}: holds entry {entry.get('seq')} (entries were removed or inserted before it)"
            )
    else:
        expected = hashlib.sha256(previous).hexdigest() if previous is not None else GENESIS
        if entry.get("prev") != expected:
            problems.append(f"line {number}: does not follow line {number - 1} (edited or removed lines)")
        if entry.get("digest") != entry_digest(entry):
            problems.append(f"line {number}: edited (its digest does not match its fields)")
    if entry.get("payload_sha256") != payload_sha256(entry.get("payload")):
        problems.append(f"line {number}: payload does not match its payload_sha256")
    return problems


def verify_log(
    path: Path, anchor: Anchor | None = None, *, anchor_source: str = "given"
) -> AuditVerification:
    """Check the whole log: every line's chain link and digest, against the stored anchor and ``anchor``.

    Keyed entries are checked with the site's key; an unkeyed entry after a keyed one, a
    keyed log without its key, a missing stored anchor, or a log that holds fewer entries
    (or other ones) than an anchor saw are all problems.
    """
    log_path = Path(path)
    problems: list[str] = []
    try:
        key = read_key(key_path(log_path))
    except AuditLogError as err:
        key = None
        problems.append(str(err))
    stored_path = anchor_path(log_path)
    stored: Anchor | None = None
    if stored_path.exists():
        try:
            stored = read_anchor(stored_path)
        except AuditLogError as err:
            problems.append(f"stored anchor: {err}")
    wanted: list[tuple[str, Anchor]] = [(f"stored ({stored_path.name})", stored)] if stored else []
    if anchor is not None:
        wanted.append((anchor_source, anchor))
    at: dict[int, str] = {}
    number = keyed = 0
    previous: bytes | None = None
    seen_keyed = False
    if log_path.exists():
        with open(log_path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                line = raw.rstrip(b"\n")
                entry = _parse(line)
                if entry is None:
                    problems.append(f"line {number}: not JSON")
                elif entry.get("chain") == KEYED:
                    keyed += 1
                    seen_keyed = True
                    problems += _check_line(number, entry, line, previous, key)
                else:
                    if seen_keyed:
                        problems.append(
                            f"line {number}: unkeyed after keyed entries (rewritten without the key)"
                        )
                    problems += _check_line(number, entry, line, previous, key)
                if key is not None and any(a.entries == number for _, a in wanted):
                    at[number] = mac(key, line)
                previous = line
    if keyed and key is None:
        problems.append(
            f"the log is keyed but its key {key_path(log_path).name} is missing: nothing can be checked"
        )
    if keyed and key is not None and not stored_path.exists():
        problems.append(
            f"the stored anchor {stored_path.name} is missing (deleted?): check the log against an anchor "
            "you exported (--anchor FILE)"
        )
    checks: list[AnchorCheck] = []
    for source, given in wanted:
        if key is None:
            problem: str | None = "cannot be checked without the audit key"
        else:
            problem = anchor_problem(given, key, number, at.get(given.entries))
        if problem:
            problems.append(f"{source} anchor: {problem}")
        checks.append(AnchorCheck(source, given.entries, given.time, problem))
    current = None
    if key is not None and keyed and previous is not None:
        current = make_anchor(key, log_path.name, number, mac(key, previous))
    open_to_others = tuple(p.name for p in (log_path, key_path(log_path), stored_path) if loose(p))
    return AuditVerification(
        path=log_path,
        entries=number,
        keyed_entries=keyed,
        key_present=key is not None,
        problems=tuple(problems),
        anchors=tuple(checks),
        current_anchor=current,
        loose=open_to_others,
    )


def verify_chain(path: Path, anchor: Anchor | None = None) -> list[str]:
    """Problems with the chain (empty list = intact): edited, inserted, removed or cut entries.

    The short form of :func:`verify_log` (which also says whether the log is keyed and
    which anchors were compared).
    """
    return list(verify_log(path, anchor).problems)
