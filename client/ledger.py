"""The site's release ledger: which patients each released aggregate was computed over.

Two aggregates over patient sets that differ by one patient give that patient's value by
subtraction (``n2 * mean2 - n1 * mean1``), whatever the minimum count of either. The site
therefore remembers, for every evaluation/comparison reply it sent, the set of patients the
numbers summarise, and refuses a new reply whose patient set differs from an earlier one by
at least one and fewer than ``min-patients`` patients (policy.toml): either the same patients
(a study run again, another model) or enough new ones that no single patient stands out.

Patients are stored as keyed hashes (HMAC-SHA256 with a random key kept in the ledger's own
first line), never as their keys: the ledger stays at the site, beside the audit log
(``<site>.releases.jsonl``, mode 0600), and is never sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

LEDGER_SUFFIX = ".releases.jsonl"
_FORMAT = "sarcofed-release-ledger-v1"


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
    site = Path(site_dir).expanduser().resolve()
    return site.with_name(site.name + LEDGER_SUFFIX)


def _create(path: Path) -> bytes:
    key = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"format": _FORMAT, "key": key.hex()}) + "\n")
    return key


@dataclass(frozen=True)
class ReleaseLedger:
    """The ledger of one site (created with a fresh key on first use)."""

    path: Path

    @classmethod
    def for_site(cls, site_dir: Path) -> ReleaseLedger:
        return cls(ledger_path(site_dir))

    def _key(self) -> bytes | None:
        if not self.path.exists():
            return None
        with open(self.path, encoding="utf-8") as handle:
            header = json.loads(handle.readline() or "{}")
        if header.get("format") != _FORMAT:
            raise ValueError(f"{self.path}: not a sarcofed release ledger (first line {header!r})")
        return bytes.fromhex(str(header["key"]))

    def _hash(self, key: bytes, patients: Iterable[str]) -> frozenset[str]:
        return frozenset(hmac.new(key, p.encode("utf-8"), hashlib.sha256).hexdigest() for p in patients)

    def prior(self) -> list[PriorRelease]:
        """Every earlier release, oldest first (none when the ledger does not exist yet)."""
        if not self.path.exists():
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
                    raise ValueError(f"{self.path}:{number}: not a ledger entry ({err})") from err
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
        key = self._key() or _create(self.path)
        row = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "run_id": int(run_id),
            "task": task,
            "patients": sorted(self._hash(key, patients)),
            "epsilon": float(epsilon),
        }
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


__all__ = ["LEDGER_SUFFIX", "PriorRelease", "ReleaseLedger", "ledger_path"]
