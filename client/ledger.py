"""The site's release ledger: which patients each released aggregate was computed over.

Two aggregates over patient sets that differ by one patient give that patient's value by
subtraction (``n2 * mean2 - n1 * mean1``), whatever the minimum count of either. The site
therefore remembers, for every evaluation/comparison reply it sent, the set of patients the
numbers summarise, and refuses a new reply whose patient set differs from an earlier one by
at least one and fewer than ``min-patients`` patients (policy.toml): either the same patients
(a study run again, another model) or enough new ones that no single patient stands out.

Patients are stored as keyed hashes (HMAC-SHA256 with a random key kept in the ledger's own
first line), never as their keys: the ledger stays at the site, beside the audit log
(``<site>.releases.jsonl``, mode 0600, written with ``client.site_files``), and is never sent.
Moving it aside resets the site's differencing memory and its DP budget (the audit log still
records every reply and every epsilon spent).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from client.site_files import append_private, beside_site, write_private
from common.errors import SarcofedError

log = logging.getLogger(__name__)

LEDGER_SUFFIX = ".releases.jsonl"
_FORMAT = "sarcofed-release-ledger-v1"
_KEY_BYTES = 32


@dataclass(frozen=True)
class PriorRelease:
    """One earlier release: when, for which run and task, over which (hashed) patients."""

    time: str
    run_id: int
    task: str
    patients: frozenset[str]
    #: differential-privacy loss spent by this release (0 for a release without DP)
    epsilon: float = 0.0


def ledger_path(site_dir: Path) -> Path:
    """``<parent>/<folder name>.releases.jsonl`` beside the site folder (like the audit log)."""
    return beside_site(site_dir, LEDGER_SUFFIX)


def _unusable(path: Path, problem: str) -> SarcofedError:
    """The error for a ledger sarcofed cannot read: what is wrong and the fix, never its content."""
    return SarcofedError(
        f"{path}: {problem}; nothing is released until it is fixed. Restore it from backup, or move "
        f"{path.name} aside: that resets this site's DP budget and its memory of what it released "
        "(the audit log still lists every reply)"
    )


@dataclass(frozen=True)
class ReleaseLedger:
    """The ledger of one site (created with a fresh key on first use)."""

    path: Path

    @classmethod
    def for_site(cls, site_dir: Path) -> ReleaseLedger:
        return cls(ledger_path(site_dir))

    def _key(self) -> bytes | None:
        """The ledger's key (``None`` before the first release); ``SarcofedError`` when unreadable."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                first = handle.readline()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise _unusable(self.path, f"cannot read the release ledger ({type(err).__name__})") from err
        try:
            header = json.loads(first)
            if header.get("format") != _FORMAT:
                raise ValueError("another format")
            key = bytes.fromhex(str(header["key"]))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise _unusable(self.path, "its first line is not a sarcofed release ledger header") from err
        if len(key) != _KEY_BYTES:
            raise _unusable(self.path, "its key is not a release ledger key")
        return key

    def _key_or_create(self) -> bytes:
        """The key, made with the ledger (0600) on the first release."""
        key = self._key()
        if key is not None:
            return key
        key = secrets.token_bytes(_KEY_BYTES)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps({"format": _FORMAT, "key": key.hex()}) + "\n"
        try:
            write_private(self.path, header.encode("utf-8"), exclusive=True)
        except FileExistsError:  # another reply made it first: use its key
            return self._key() or key
        return key

    def _hash(self, key: bytes, patients: Iterable[str]) -> frozenset[str]:
        return frozenset(hmac.new(key, p.encode("utf-8"), hashlib.sha256).hexdigest() for p in patients)

    def prior(self) -> list[PriorRelease]:
        """Every earlier release, oldest first (none when the ledger does not exist yet)."""
        if self._key() is None:  # also checks the header: a damaged ledger is never half-read
            return []
        out = []
        with open(self.path, encoding="utf-8") as handle:
            handle.readline()
            for number, line in enumerate(handle, 2):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    patients = frozenset(str(p) for p in row["patients"])
                    spent = float(row.get("epsilon", 0.0))
                    out.append(
                        PriorRelease(str(row["time"]), int(row["run_id"]), str(row["task"]), patients, spent)
                    )
                except (ValueError, KeyError, TypeError) as err:
                    raise _unusable(self.path, f"line {number} is not a ledger entry") from err
        return out

    def too_close(self, patients: Iterable[str], min_patients: int) -> PriorRelease | None:
        """The earliest prior release whose patient set differs from ``patients`` by 1..min-1."""
        key = self._key()
        if key is None:
            return None
        current = self._hash(key, patients)
        for release in self.prior():
            difference = len(current ^ release.patients)
            if 0 < difference < min_patients:
                return release
        return None

    def spent(self, run_id: int | None = None) -> float:
        """Epsilon spent by earlier DP releases: of run ``run_id``, or of all runs."""
        return sum(r.epsilon for r in self.prior() if run_id is None or r.run_id == run_id)

    def record(self, *, run_id: int, task: str, patients: Iterable[str], epsilon: float = 0.0) -> None:
        """Append one release (creates the ledger, mode 0600, on first use)."""
        key = self._key_or_create()
        row = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "run_id": int(run_id),
            "task": task,
            "patients": sorted(self._hash(key, patients)),
            "epsilon": float(epsilon),
        }
        append_private(self.path, json.dumps(row, sort_keys=True))


__all__ = ["LEDGER_SUFFIX", "PriorRelease", "ReleaseLedger", "ledger_path"]
